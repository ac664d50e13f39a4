//! `web secrets DIR`: the stack's passwords, written once into one directory per consumer, so
//! that no password is committed and none is ever typed. docker-compose.yml runs it as a
//! one-shot service before `db`, `cache` and `web` start, with each consumer's volume under
//! `DIR/<consumer>/`; `scripts/make-secrets` runs it to fill a directory by hand. It lives in
//! the `web` binary because the image has no shell and nothing else to run.
//!
//! | file | written to | what |
//! | --- | --- | --- |
//! | `db_password` | `db/` | PostgreSQL's superuser `admin`, for people |
//! | `web_db_password` | `db/` (init script), `web/` | PostgreSQL's role `web` |
//! | `redis_password` | `web/` | Redis's ACL user `web` |
//! | `redis_admin_password` | `cache/` | Redis's ACL user `admin`, for people and the cache's own upkeep |
//! | `redis_users.acl` | `cache/` | Redis's users, both passwords as SHA-256 ([`acl`]) |
//! | `redis_acl` | `cache/` | a link to `redis_users.acl`: the name `cache` has always read it by |
//!
//! Each password has one value: the file `DIR/from/<name>` when there is one (bring your own:
//! it wins, and the consumers' copies are rewritten to it); otherwise the copy its first
//! consumer already has (databases keep the password they were initialised with, so a second
//! run changes nothing); otherwise a fresh random one from the operating system. The ACL file
//! is rewritten from the passwords every time: it is derived, never edited.

use std::fs;
use std::io::{ErrorKind, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::Path;

use anyhow::{Context, bail};
use ring::digest;
use ring::rand::{SecureRandom, SystemRandom};

/// Every password, with the consumers (subdirectories of DIR) that get a copy, first the one
/// whose existing copy is kept: `db` for `web_db_password`, as the database holds that one.
pub const PASSWORDS: [(&str, &[&str]); 4] = [
    ("db_password", &["db"]),
    ("web_db_password", &["db", "web"]),
    ("redis_password", &["web"]),
    ("redis_admin_password", &["cache"]),
];

/// Where the bring-your-own passwords are read from, under DIR.
pub const FROM: &str = "from";
/// The Redis ACL file, in DIR/cache/ (Kubernetes' overlays take it under this name too).
pub const ACL_FILE: &str = "redis_users.acl";
/// The name `cache` reads the ACL by (`--aclfile /run/secrets/redis_acl`): a relative link
/// beside the file, as one volume mounted at /run/secrets serves both names.
pub const ACL_LINK: &str = "redis_acl";

/// Random bytes per password: 256 bits, written as 64 hexadecimal characters (no character a
/// URL, a shell or a config file would need to quote).
const PASSWORD_BYTES: usize = 32;

/// Modes. Each consumer's directory is a volume mounted into that consumer alone, where the
/// files are read by other uids than the writer's (root in the one-shot): `web` as 65532, the
/// official images' `postgres` and `redis` as 999. Nothing can give each file to its reader
/// (no CAP_CHOWN in the one-shot, and one file may have two readers in different containers),
/// so the files are readable by all (0644) and the confinement is the mount: no container
/// sees another's directory. On the host `scripts/make-secrets` keeps DIR itself at 0700.
const DIR_MODE: u32 = 0o755;
const FILE_MODE: u32 = 0o644;

/// The Redis users, in the one place they are spelled out: `default` (no password, PING only:
/// healthchecks, `redis-cli ping`), `web` (the service: its two keys and the commands it
/// uses, its counting in Redis Functions it may only call) and `admin` (everything: for people
/// and for loading the functions). Passwords appear only as SHA-256 hex.
pub fn acl(redis_password: &str, redis_admin_password: &str) -> String {
    format!(
        "user default on nopass resetchannels -@all +ping\n\
         user web on #{} resetchannels ~visitas ~visitas:fence -@all +ping +info +get +set +incrby +hmget +hset +fcall +fcall_ro\n\
         user admin on #{} ~* &* +@all\n",
        sha256_hex(redis_password),
        sha256_hex(redis_admin_password),
    )
}

fn sha256_hex(text: &str) -> String {
    hex(digest::digest(&digest::SHA256, text.as_bytes()).as_ref())
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Writes every consumer's files under `dir` (see the module's documentation).
pub fn write(dir: &Path) -> anyhow::Result<()> {
    let rng = SystemRandom::new();
    let mut values = Vec::with_capacity(PASSWORDS.len());
    for (name, consumers) in PASSWORDS {
        let value = match read_password(&dir.join(FROM).join(name))? {
            Some(value) => value,
            None => match kept(dir, name, consumers)? {
                Some(value) => value,
                None => fresh(&rng)?,
            },
        };
        for consumer in consumers {
            let path = dir.join(consumer).join(name);
            if read_password(&path)?.as_deref() != Some(value.as_str()) {
                write_file(&path, &format!("{value}\n"))?;
            }
        }
        values.push((name, value));
    }
    let value = |wanted: &str| {
        values
            .iter()
            .find(|(name, _)| *name == wanted)
            .map(|(_, value)| value.as_str())
            .with_context(|| format!("no value for {wanted}"))
    };
    let cache = dir.join("cache");
    write_file(
        &cache.join(ACL_FILE),
        &acl(value("redis_password")?, value("redis_admin_password")?),
    )?;
    link(&cache.join(ACL_LINK), Path::new(ACL_FILE))
}

/// The first consumer's existing copy of a password.
fn kept(dir: &Path, name: &str, consumers: &[&str]) -> anyhow::Result<Option<String>> {
    for consumer in consumers {
        if let Some(value) = read_password(&dir.join(consumer).join(name))? {
            return Ok(Some(value));
        }
    }
    Ok(None)
}

/// A password file's value, without the trailing newline readers ignore; None when the file
/// does not exist or holds nothing (an empty file has no password to keep).
fn read_password(path: &Path) -> anyhow::Result<Option<String>> {
    match fs::read_to_string(path) {
        Ok(text) => {
            let value = text.trim_end_matches(['\r', '\n']);
            if value.contains(['\r', '\n']) {
                bail!("{}: a password is one line", path.display());
            }
            Ok((!value.is_empty()).then(|| value.to_owned()))
        }
        Err(e) if e.kind() == ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e).with_context(|| format!("cannot read {}", path.display())),
    }
}

fn fresh(rng: &SystemRandom) -> anyhow::Result<String> {
    let mut bytes = [0u8; PASSWORD_BYTES];
    rng.fill(&mut bytes)
        .map_err(|_| anyhow::anyhow!("the operating system gave no random bytes"))?;
    Ok(hex(&bytes))
}

/// Writes `path` whole or not at all (a temporary file renamed over it), so a reader or an
/// interrupted run never sees half a password; makes its directory if needed.
fn write_file(path: &Path, content: &str) -> anyhow::Result<()> {
    let parent = path
        .parent()
        .with_context(|| format!("{}: no directory", path.display()))?;
    make_dir(parent)?;
    let name = path
        .file_name()
        .with_context(|| format!("{}: no file name", path.display()))?;
    let temporary = parent.join(format!(".{}.tmp", name.to_string_lossy()));
    let written = fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(FILE_MODE)
        .open(&temporary)
        .and_then(|mut file| {
            file.write_all(content.as_bytes())?;
            // the mode asked for at creation is narrowed by the umask: set it as meant
            file.set_permissions(fs::Permissions::from_mode(FILE_MODE))?;
            file.sync_all()
        })
        .and_then(|()| fs::rename(&temporary, path));
    written.with_context(|| format!("cannot write {}", path.display()))
}

fn make_dir(dir: &Path) -> anyhow::Result<()> {
    fs::DirBuilder::new()
        .recursive(true)
        .mode(DIR_MODE)
        .create(dir)
        .with_context(|| format!("cannot create the directory {}", dir.display()))
}

/// Makes `path` a symbolic link to `target`, unless it already is one.
fn link(path: &Path, target: &Path) -> anyhow::Result<()> {
    match fs::read_link(path) {
        Ok(existing) if existing == target => return Ok(()),
        Ok(_) => fs::remove_file(path),
        Err(e) if e.kind() == ErrorKind::NotFound => Ok(()),
        Err(e) if e.kind() == ErrorKind::InvalidInput => fs::remove_file(path), // a plain file
        Err(e) => Err(e),
    }
    .and_then(|()| std::os::unix::fs::symlink(target, path))
    .with_context(|| format!("cannot link {} to {}", path.display(), target.display()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    /// The files `write` produces (the link aside).
    fn files(dir: &Path) -> Vec<PathBuf> {
        let mut files: Vec<PathBuf> = PASSWORDS
            .iter()
            .flat_map(|(name, consumers)| consumers.iter().map(move |c| dir.join(c).join(name)))
            .collect();
        files.push(dir.join("cache").join(ACL_FILE));
        files
    }

    fn read(path: PathBuf) -> String {
        fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
    }

    fn password(dir: &Path, consumer: &str, name: &str) -> String {
        read(dir.join(consumer).join(name)).trim_end().to_owned()
    }

    #[test]
    fn generates_every_file_fresh_and_random() {
        let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        write(a.path()).unwrap();
        write(b.path()).unwrap();
        let mut seen = std::collections::HashSet::new();
        for (name, consumers) in PASSWORDS {
            let value = password(a.path(), consumers[0], name);
            assert_eq!(value.len(), 2 * PASSWORD_BYTES, "{name}");
            assert!(value.bytes().all(|c| c.is_ascii_hexdigit()), "{name}");
            assert!(read(a.path().join(consumers[0]).join(name)).ends_with('\n'));
            for consumer in consumers {
                assert_eq!(
                    password(a.path(), consumer, name),
                    value,
                    "{consumer}/{name}"
                );
            }
            assert_ne!(
                password(b.path(), consumers[0], name),
                value,
                "the same {name} twice"
            );
            assert!(seen.insert(value), "{name} equals another password");
        }
        for path in files(a.path()) {
            let mode = fs::metadata(&path).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode, FILE_MODE, "{}", path.display());
        }
        let mode = fs::metadata(a.path().join("web"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, DIR_MODE);
        let mut names: Vec<_> = fs::read_dir(a.path().join("cache"))
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        names.sort();
        assert_eq!(
            names,
            ["redis_acl", "redis_admin_password", "redis_users.acl"],
            "no temporary file left"
        );
    }

    #[test]
    fn existing_files_are_kept() {
        let dir = tempfile::tempdir().unwrap();
        write(dir.path()).unwrap();
        let before: Vec<String> = files(dir.path()).into_iter().map(read).collect();
        // as a database volume initialised earlier: its copy wins over a lost or newer one
        fs::remove_file(dir.path().join("web/web_db_password")).unwrap();
        write(dir.path()).unwrap();
        let after: Vec<String> = files(dir.path()).into_iter().map(read).collect();
        assert_eq!(before, after);
        // a copy written by hand without a newline is kept as it is
        fs::write(dir.path().join("db/db_password"), "mine").unwrap();
        write(dir.path()).unwrap();
        assert_eq!(read(dir.path().join("db/db_password")), "mine");
    }

    #[test]
    fn bring_your_own_wins() {
        let dir = tempfile::tempdir().unwrap();
        write(dir.path()).unwrap();
        let admin = password(dir.path(), "db", "db_password");
        fs::create_dir(dir.path().join(FROM)).unwrap();
        fs::write(dir.path().join("from/web_db_password"), "own db\n").unwrap();
        fs::write(dir.path().join("from/redis_password"), "own redis").unwrap();
        fs::write(dir.path().join("from/README.md"), "not a password\n").unwrap();
        write(dir.path()).unwrap();
        assert_eq!(password(dir.path(), "db", "web_db_password"), "own db");
        assert_eq!(password(dir.path(), "web", "web_db_password"), "own db");
        assert_eq!(password(dir.path(), "web", "redis_password"), "own redis");
        assert_eq!(
            password(dir.path(), "db", "db_password"),
            admin,
            "not brought: kept"
        );
        let admin = password(dir.path(), "cache", "redis_admin_password");
        assert_eq!(
            read(dir.path().join("cache").join(ACL_FILE)),
            acl("own redis", &admin)
        );
    }

    #[test]
    fn acl_names_the_users_with_their_hashes() {
        let text = acl("web", "admin");
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 3);
        assert_eq!(lines[0], "user default on nopass resetchannels -@all +ping");
        assert_eq!(
            lines[1],
            format!(
                "user web on #{} resetchannels ~visitas ~visitas:fence -@all +ping +info +get +set +incrby +hmget +hset +fcall +fcall_ro",
                SHA256_WEB
            )
        );
        assert_eq!(
            lines[2],
            format!("user admin on #{SHA256_ADMIN} ~* &* +@all")
        );
        assert!(text.ends_with('\n'));
        // the file on disk is the same text, and the link resolves to it
        let dir = tempfile::tempdir().unwrap();
        fs::create_dir(dir.path().join(FROM)).unwrap();
        fs::write(dir.path().join("from/redis_password"), "web\n").unwrap();
        fs::write(dir.path().join("from/redis_admin_password"), "admin\n").unwrap();
        write(dir.path()).unwrap();
        assert_eq!(read(dir.path().join("cache").join(ACL_LINK)), text);
        assert_eq!(
            fs::read_link(dir.path().join("cache").join(ACL_LINK)).unwrap(),
            Path::new(ACL_FILE)
        );
    }

    // sha256("web") and sha256("admin"), as `printf %s web | sha256sum` prints them
    const SHA256_WEB: &str = "4b5e57f6eb2f42b9039b3d1e13929295f231749c510cbe341cd68036d9af97e2";
    const SHA256_ADMIN: &str = "8c6976e5b5410415bde908bd4dee15dfb167a9c873fc4bb8a81f6f2ab448a918";

    #[test]
    fn errors_name_the_path() {
        let dir = tempfile::tempdir().unwrap();
        fs::create_dir_all(dir.path().join("from/db_password")).unwrap(); // a directory
        let e = format!("{:#}", write(dir.path()).unwrap_err());
        assert!(e.contains("from/db_password"), "{e}");
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join("web"), "a file where a directory goes").unwrap();
        let e = format!("{:#}", write(dir.path()).unwrap_err());
        assert!(e.contains("web"), "{e}");
        let dir = tempfile::tempdir().unwrap();
        fs::create_dir(dir.path().join(FROM)).unwrap();
        fs::write(dir.path().join("from/redis_password"), "two\nlines\n").unwrap();
        let e = format!("{:#}", write(dir.path()).unwrap_err());
        assert!(
            e.contains("from/redis_password: a password is one line"),
            "{e}"
        );
    }
}
