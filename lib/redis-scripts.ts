// The Lua scripts of the cluster store (lib/redis-cluster.ts): each runs atomically in Redis,
// so a read-then-write on presence, a node key or a queue cannot interleave with another node's.

// Refreshes this node's key while it still holds it; takes it back if it expired (a pause, a
// Redis restart without its data). 0: another process holds this node id now.
export const HEARTBEAT_SCRIPT = `
local current = redis.call('GET', KEYS[1])
if current == ARGV[1] then return redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
if current then return 0 end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
redis.call('SADD', KEYS[2], ARGV[3])
return 1`;

// This node now holds the identity: presence points here, the previous holder's set forgets it.
// Returns the join's token: larger than every earlier join's (Redis time in microseconds, or the
// last token + 1), so announcements of one identity's sessions can be ordered (lib/presence-order.ts).
// It is kept in KEYS[3] as '%.0f' text: Lua would write a number that large as 1.7e+15.
// ARGV[4] is --max-connections: a new session (not one replacing the identity's older one) past
// it is refused here, with -1, so auths racing on several nodes cannot pass it together.
export const JOIN_SCRIPT = `
local previous = redis.call('HGET', KEYS[1], ARGV[1])
if not previous and redis.call('HLEN', KEYS[1]) >= tonumber(ARGV[4]) then return -1 end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
redis.call('SADD', KEYS[2], ARGV[1])
if previous and previous ~= ARGV[2] then redis.call('SREM', ARGV[3] .. previous, ARGV[1]) end
local now = redis.call('TIME')
local token = tonumber(now[1]) * 1000000 + tonumber(now[2])
local last = tonumber(redis.call('GET', KEYS[3]) or '0')
if token <= last then token = last + 1 end
redis.call('SET', KEYS[3], string.format('%.0f', token))
return token`;

// Only the node named in the presence entry removes it: a newer session elsewhere stays.
export const LEAVE_SCRIPT = `
if redis.call('HGET', KEYS[1], ARGV[1]) == ARGV[2] then redis.call('HDEL', KEYS[1], ARGV[1]) end
redis.call('SREM', KEYS[2], ARGV[1])
return 1`;

// A dead node: its presence entries that still name it go, then the node itself.
export const BURY_SCRIPT = `
local ids = redis.call('SMEMBERS', KEYS[2])
local removed = 0
for _, id in ipairs(ids) do
  if redis.call('HGET', KEYS[1], id) == ARGV[1] then redis.call('HDEL', KEYS[1], id); removed = removed + 1 end
end
redis.call('DEL', KEYS[2])
redis.call('SREM', KEYS[3], ARGV[1])
return removed`;

// Frees this node's id at a clean stop, unless another process took it.
export const RELEASE_SCRIPT = `
if redis.call('GET', KEYS[1]) == ARGV[1] then redis.call('DEL', KEYS[1]) end
redis.call('SREM', KEYS[2], ARGV[2])
return 1`;

// Appends a target's new queued copies, notes when its earliest copy expires, and pops the
// oldest copies past the cap (returned, to be reported expired).
export const ENQUEUE_SCRIPT = `
for i = 4, #ARGV do redis.call('RPUSH', KEYS[1], ARGV[i]) end
local current = redis.call('ZSCORE', KEYS[2], ARGV[1])
if not current or tonumber(ARGV[3]) < tonumber(current) then redis.call('ZADD', KEYS[2], ARGV[3], ARGV[1]) end
local excess = redis.call('LLEN', KEYS[1]) - tonumber(ARGV[2])
if excess > 0 then return redis.call('LPOP', KEYS[1], excess) end
return {}`;

// How many queued copies the store holds: every target with copies is in the expiry index
// (KEYS[1]); ARGV[1] is the prefix of the targets' lists. O(targets with copies), for a scrape.
export const DEPTH_SCRIPT = `
local total = 0
for _, target in ipairs(redis.call('ZRANGE', KEYS[1], 0, -1)) do total = total + redis.call('LLEN', ARGV[1] .. target) end
return total`;

// Removes a target's expired copies (returned) and keeps the rest in order; the expiry index
// then holds the earliest remaining expiry, or forgets the target.
export const EXPIRE_SCRIPT = `
local entries = redis.call('LRANGE', KEYS[1], 0, -1)
local expired, kept, earliest = {}, {}, nil
for _, text in ipairs(entries) do
  local ok, entry = pcall(cjson.decode, text)
  local at = ok and type(entry) == 'table' and tonumber(entry.expires_at) or nil
  if at and at <= tonumber(ARGV[2]) then
    table.insert(expired, text)
  else
    table.insert(kept, text)
    if at and (not earliest or at < earliest) then earliest = at end
  end
end
if #expired > 0 then
  redis.call('DEL', KEYS[1])
  for _, text in ipairs(kept) do redis.call('RPUSH', KEYS[1], text) end
end
if earliest then redis.call('ZADD', KEYS[2], earliest, ARGV[1]) else redis.call('ZREM', KEYS[2], ARGV[1]) end
return expired`;

// A change of an identity's document (name, tags, meta, key, ...): stored whole with the next
// revision, made here so changes are numbered in the order Redis took them, and announced from
// here so announcements go out in that order. Revisions come from one counter (KEYS[2]) for all
// identities, so a document `migrate` wrote over (it has no revision: 0) or a deleted and written
// again one still gets a revision above any a node holds. ARGV[2] is the document's JSON object
// without a revision (never empty); ARGV[3] the writing node's id as a JSON string. A removed
// identity (its tombstone KEYS[4] is set) is not written: answers 0.
export const IDENTITY_WRITE_SCRIPT = `
if redis.call('EXISTS', KEYS[4]) == 1 then return 0 end
local revision = redis.call('INCR', KEYS[2])
local current = redis.call('HGET', KEYS[1], ARGV[1])
if current then
  local ok, doc = pcall(cjson.decode, current)
  local stored = ok and type(doc) == 'table' and tonumber(doc.revision) or 0
  if stored >= revision then
    revision = stored + 1
    redis.call('SET', KEYS[2], string.format('%d', revision))
  end
end
local record = '{"revision":' .. string.format('%d', revision) .. ',' .. string.sub(ARGV[2], 2)
redis.call('HSET', KEYS[1], ARGV[1], record)
redis.call('PUBLISH', KEYS[3], '{"t":"identity","node":' .. ARGV[3] .. ',"doc":' .. record .. '}')
return revision`;

// An identity's liveness (ARGV[2]: JSON of times): merged field by field into its entry in
// KEYS[2] by taking the later time, so a write that arrives late never moves a time back and
// never touches the document. An identity no longer in KEYS[1] (deleted) gets no entry.
// Announces the merged times; returns 0 when the identity is gone, else 1.
export const IDENTITY_SEEN_SCRIPT = `
if redis.call('HEXISTS', KEYS[1], ARGV[1]) == 0 then return 0 end
local incoming = cjson.decode(ARGV[2])
local merged = {}
local held = redis.call('HGET', KEYS[2], ARGV[1])
if held then
  local ok, doc = pcall(cjson.decode, held)
  if ok and type(doc) == 'table' then merged = doc end
end
for _, field in ipairs({'lastSeen', 'lastConnectedAt', 'lastDisconnectedAt', 'lastHeartbeatAt'}) do
  local time = incoming[field]
  if type(time) == 'number' and (type(merged[field]) ~= 'number' or time > merged[field]) then merged[field] = time end
end
local reported = incoming.lastSelfReportAt
if type(reported) == 'number' and (type(merged.lastSelfReportAt) ~= 'number' or reported > merged.lastSelfReportAt) then
  merged.lastSelfReportAt = reported
  merged.selfReportValid = incoming.selfReportValid
end
local text = cjson.encode(merged)
redis.call('HSET', KEYS[2], ARGV[1], text)
redis.call('PUBLISH', KEYS[3], '{"t":"identity_seen","node":' .. ARGV[3] .. ',"id":' .. cjson.encode(ARGV[1]) .. ',"seen":' .. text .. '}')
return 1`;
