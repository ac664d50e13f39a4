#!lua name=desafio3
-- The counting functions of desafio3 (docs/counting.md), as a Redis Functions library.
-- Functions, not scripts: `web` may call them (FCALL) but not run Lua of its own (no EVAL, no
-- FUNCTION LOAD), so it cannot wedge Redis with a script that never ends. They are stored in
-- Redis's data (the append-only file), and the cache healthcheck (healthcheck.sh, beside this
-- file) loads them as the `admin` user whenever they are missing or older than this file.
-- Commands called here are checked against the caller's ACL: `web` holds INFO, GET, SET,
-- INCRBY, HMGET and HSET on its two keys.

-- The identity of this Redis's data, which changes whenever the data may have been replaced:
-- `run_id` is new at every start of the process (a restart from an older file is noticed);
-- `master_replid` is new on every start and promotion, and is taken from the master on a full
-- resync (a server whose data was replaced by a copy, as a failover and failback or a repaired
-- replica do, is noticed although its `run_id` stays).
-- Then the counter's value, refused unless it is a count this service could have written:
-- digits, at most MAX_PLAUSIBLE in src/store/cache.rs (the literal below).
local function read(keys)
  local info = redis.call('INFO', 'server', 'replication')
  local id = string.match(info, 'run_id:(%x+)') .. ':' .. string.match(info, 'master_replid:(%x+)')
  local raw = redis.call('GET', keys[1])
  if raw and (#raw > 15 or not string.match(raw, '^%d+$') or tonumber(raw) > 999999998999999) then
    return nil, redis.error_reply('IMPLAUSIBLE the counter holds no plausible count')
  end
  local token, top = unpack(redis.call('HMGET', keys[2], 'token', 'top'))
  return {id = id, raw = raw, token = token, top = top}
end

-- Adds args[1] visits and returns the new total, if this Redis is still the one the caller
-- was told may count: its fence (args[2]) names this Redis's data and the token, and the
-- counter is not below its top. Otherwise the error code UNFENCED, with nothing counted: the
-- caller fences again. A missing counter is never counted from zero.
local function count(keys, args)
  local s, refused = read(keys)
  if not s then
    return refused
  end
  if not s.raw or not s.token or not s.top or s.id .. ':' .. s.token ~= args[2] then
    return redis.error_reply('UNFENCED this Redis is not the fenced counter')
  end
  if tonumber(s.raw) < tonumber(s.top) then
    return redis.error_reply('UNFENCED the counter went back')
  end
  local total = redis.call('INCRBY', keys[1], args[1])
  redis.call('HSET', keys[2], 'top', total)
  return total
end

-- Fences this Redis. When the fence of record (args[3]) still names this Redis's data and
-- token, it is kept, and the counter is only held to its own top (a counter below it was
-- lowered: raised, and the fence renewed). Otherwise the counter is raised to the counter of
-- record PostgreSQL held when asked (args[1]) and to its top, and the new token args[2] is
-- written, so that counts taken under any older fence can no longer be confirmed.
-- A kept fence is not raised to PostgreSQL's value: under the same data and token, every count
-- handed out came from this counter, so a value above it can only be a confirmation sent ahead
-- for a batch this Redis is still to count (or that was never answered). Raising and renewing
-- there would refuse that batch after its confirmation went through, skipping its numbers with
-- no fault at all, and unfence every other replica.
-- Returns the counter and the fence now in force.
local function fence(keys, args)
  local s, refused = read(keys)
  if not s then
    return refused
  end
  local raw, token = s.raw, s.token
  local renew = not token or s.id .. ':' .. token ~= args[3]
  local floor = '0'
  if renew then
    floor = args[1]
  end
  if s.top and tonumber(s.top) > tonumber(floor) then
    floor = s.top
  end
  if not raw or tonumber(raw) < tonumber(floor) then
    raw = floor
    redis.call('SET', keys[1], raw)
    renew = true
  end
  if renew then
    token = args[2]
  end
  redis.call('HSET', keys[2], 'token', token, 'top', raw)
  return {raw, s.id .. ':' .. token}
end

redis.register_function('desafio3_count', count)
redis.register_function('desafio3_fence', fence)
-- Which copy of this file is loaded: the healthcheck puts the file's checksum in place of the
-- marker when it loads it, and loads it again when the two differ. `web` calls it to tell
-- that the functions are there.
redis.register_function{
  function_name = 'desafio3_version',
  callback = function() return '@VERSION@' end,
  flags = {'no-writes'},
}
