//! The counting invariant, checked the same way by every test that counts through faults.

/// The counting invariant over every count handed out in a run (README, "never loses or
/// repeats a count"), for the tests that count through faults.
pub struct Counted {
    /// Counts handed out, each once.
    pub distinct: usize,
    pub highest: i64,
    /// The counter of record at the end.
    pub record: i64,
    /// Numbers of record never handed out.
    pub gaps: i64,
    /// Counts handed out more than once.
    pub repeated: Vec<i64>,
}

impl Counted {
    pub fn of(counts: impl IntoIterator<Item = i64>, record: i64) -> Self {
        let mut seen = std::collections::HashSet::new();
        let repeated: Vec<i64> = counts.into_iter().filter(|c| !seen.insert(*c)).collect();
        let highest = seen.iter().copied().max().unwrap_or(0);
        Self {
            distinct: seen.len(),
            highest,
            record,
            gaps: record - seen.len() as i64,
            repeated,
        }
    }

    /// What breaks the invariant, a line each: a count handed out twice, a counter of record
    /// below a count handed out, more gaps than the requests that can explain them.
    pub fn violations(&self, gap_bound: i64) -> Vec<String> {
        let mut v = Vec::new();
        if !self.repeated.is_empty() {
            let some = &self.repeated[..self.repeated.len().min(8)];
            v.push(format!(
                "{} counts handed out twice, e.g. {some:?}",
                self.repeated.len()
            ));
        }
        if self.record < self.highest {
            v.push(format!(
                "counter of record {} < highest count handed out {}",
                self.record, self.highest
            ));
        }
        if self.gaps > gap_bound {
            v.push(format!(
                "{} gaps > {gap_bound} requests in flight at the faults",
                self.gaps
            ));
        }
        v
    }
}
