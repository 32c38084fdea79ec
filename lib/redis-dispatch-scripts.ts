// The Lua scripts of dispatch in a cluster (lib/redis-dispatch.ts, docs/CLUSTER.md "Dispatch").
// Each runs atomically in Redis, so choosing an employee and reserving its slot, or claiming the
// best waiting task for a free employee, cannot interleave with another node doing the same.
// They apply the single node's rules (lib/dispatch.ts): fewest tasks in progress then idle
// longest, dnd takes nothing, working takes only high, capacity is a hard cap, the sender never
// gets its own task, priorities high > normal > low, retried tasks before fresh ones.
//
// Every script gets ARGV[1] key prefix (`<cluster>:dispatch:`), ARGV[2] the banned set's key,
// ARGV[3] now (ms), ARGV[4] --max-attempts, ARGV[5] the node keys' prefix (`<cluster>:node:`);
// its own arguments follow from ARGV[6]. Results are JSON strings.

const PRELUDE = `
local P, BANNED, NOW, MAX, NODEKEY = ARGV[1], ARGV[2], tonumber(ARGV[3]), tonumber(ARGV[4]), ARGV[5]
local PRIOS = {'high', 'normal', 'low'}
-- A retried task's score sits this far before every fresh one (scores are submission numbers).
local RETRIED = 1e15
-- A lease not ended by its node (the node died or never got the task) is swept this long after its timeout.
local GRACE = 2000

local function emp(e) return redis.call('HMGET', P .. 'emp:' .. e, 'node', 'status', 'capacity', 'inprog', 'tags') end

local function accepts(f, e, prio)
  if not f[1] or f[1] == '' or f[2] == 'dnd' then return false end
  if tonumber(f[4]) >= tonumber(f[3]) then return false end
  if f[2] == 'working' and prio ~= 'high' then return false end
  return redis.call('SISMEMBER', BANNED, e) == 0
end

-- Fewest in progress, then idle longest: the score moves whenever the count changes.
local function rescore(e)
  local f = emp(e)
  if not f[1] or f[1] == '' then return end
  local score = math.min(tonumber(f[4]), 800) * 1e13 + NOW
  for _, tag in ipairs(cjson.decode(f[5])) do redis.call('ZADD', P .. 'tag:' .. tag, score, e) end
end

local function choose(tag, prio, exclude)
  for _, e in ipairs(redis.call('ZRANGE', P .. 'tag:' .. tag, 0, -1)) do
    if e ~= exclude and accepts(emp(e), e, prio) then return e end
  end
  return nil
end

local function reserve(id, e, attempt)
  local key = P .. 'task:' .. id
  local t = redis.call('HMGET', key, 'tag', 'timeout')
  local node = redis.call('HGET', P .. 'emp:' .. e, 'node')
  redis.call('HINCRBY', P .. 'emp:' .. e, 'inprog', 1)
  rescore(e)
  redis.call('HSET', key, 'state', 'in_progress', 'emp', e, 'node', node, 'attempt', attempt, 'reserved', NOW)
  redis.call('SADD', P .. 'held:' .. node, id)
  redis.call('ZADD', P .. 'leases', NOW + tonumber(t[2]) + GRACE, id)
  redis.call('HINCRBY', P .. 'count', 'p:' .. t[1], 1)
  return node
end

-- What the employee's node needs to write the task and start its lease.
local function assignment(id, e, node)
  local key = P .. 'task:' .. id
  local t = redis.call('HMGET', key, 'body', 'attempt', 'since', 'record', 'origin')
  if t[4] then redis.call('HDEL', key, 'record') end
  return {id = id, emp = e, node = node, attempt = tonumber(t[2]), body = t[1], since = tonumber(t[3]), record = t[4] or '', origin = t[5]}
end

local function take(id)
  local t = redis.call('HMGET', P .. 'task:' .. id, 'tag', 'prio')
  redis.call('ZREM', P .. 'wait:' .. t[1] .. ':' .. t[2], id)
  redis.call('ZREM', P .. 'expiry', id)
  redis.call('HINCRBY', P .. 'count', 'w:' .. t[1], -1)
end

local function enqueue(id, retried)
  local key = P .. 'task:' .. id
  local t = redis.call('HMGET', key, 'tag', 'prio', 'seq', 'expires')
  local score = tonumber(t[3])
  if retried then score = score - RETRIED end
  redis.call('HSET', key, 'state', 'waiting', 'since', NOW, 'emp', '', 'node', '')
  redis.call('ZADD', P .. 'wait:' .. t[1] .. ':' .. t[2], score, id)
  redis.call('ZADD', P .. 'expiry', tonumber(t[4]), id)
  redis.call('HINCRBY', P .. 'count', 'w:' .. t[1], 1)
  return t[1]
end

local function drop(id)
  redis.call('DEL', P .. 'task:' .. id)
  redis.call('ZREM', P .. 'all', id)
end

-- Ends the current lease. The employee's count is its own only while the employee is still on
-- the node that held the task (a new session elsewhere starts from its own count).
local function release(id)
  local t = redis.call('HMGET', P .. 'task:' .. id, 'emp', 'node', 'tag')
  local ekey = P .. 'emp:' .. t[1]
  if t[2] ~= '' and redis.call('HGET', ekey, 'node') == t[2] then
    if redis.call('HINCRBY', ekey, 'inprog', -1) < 0 then redis.call('HSET', ekey, 'inprog', 0) end
    rescore(t[1])
  end
  redis.call('SREM', P .. 'held:' .. t[2], id)
  redis.call('ZREM', P .. 'leases', id)
  redis.call('HINCRBY', P .. 'count', 'p:' .. t[3], -1)
end

-- The first waiting task this employee may take: highest priority, retried first, then oldest.
local function nextFor(e)
  local f = emp(e)
  if not f[1] or f[1] == '' then return nil end
  local tags = cjson.decode(f[5])
  for _, prio in ipairs(PRIOS) do
    if accepts(f, e, prio) then
      local best, bestScore = nil, nil
      for _, tag in ipairs(tags) do
        local head = redis.call('ZRANGE', P .. 'wait:' .. tag .. ':' .. prio, 0, 0, 'WITHSCORES')
        if head[1] and redis.call('HGET', P .. 'task:' .. head[1], 'from') ~= e then
          local score = tonumber(head[2])
          if not best or score < bestScore then best, bestScore = head[1], score end
        end
      end
      if best then return best end
    end
  end
  return nil
end

-- Gives a free employee the best waiting tasks among its tags, until it is full.
local function pump(e, out)
  while true do
    local id = nextFor(e)
    if not id then return end
    take(id)
    local attempt = tonumber(redis.call('HGET', P .. 'task:' .. id, 'attempt')) + 1
    local node = reserve(id, e, attempt)
    table.insert(out, assignment(id, e, node))
  end
end

-- Hands waiting tasks of this tag to whoever is free, the fewest-busy first.
local function dispatchWaiting(tag, skip, out)
  for _, e in ipairs(redis.call('ZRANGE', P .. 'tag:' .. tag, 0, -1)) do
    if tonumber(redis.call('HGET', P .. 'count', 'w:' .. tag) or '0') <= 0 then return end
    if e ~= skip then pump(e, out) end
  end
end

-- Ends an in-progress task: done, or a lost lease (front of its queue, or failed after the last attempt).
local function finish(id, e, attempt, kind, reason, out)
  local t = redis.call('HMGET', P .. 'task:' .. id, 'state', 'emp', 'attempt', 'tag', 'body')
  if t[1] ~= 'in_progress' or t[2] ~= e or tonumber(t[3]) ~= tonumber(attempt) then return {result = 'stale', id = id} end
  release(id)
  local result
  if kind == 'done' then
    drop(id)
    result = 'done'
  elseif tonumber(t[3]) >= MAX then
    drop(id)
    result = 'failed'
  else
    enqueue(id, true)
    result = 'requeued'
    -- Someone else first; the employee that lost it gets it back only if nobody else is free.
    dispatchWaiting(t[4], e, out)
  end
  if kind == 'done' or reason ~= 'disconnected' then pump(e, out) end
  return {result = result, id = id, emp = e, attempt = tonumber(t[3]), body = t[5], reason = reason}
end

local function offline(e, node)
  local key = P .. 'emp:' .. e
  local f = redis.call('HMGET', key, 'node', 'tags')
  if f[1] ~= node then return end
  for _, tag in ipairs(cjson.decode(f[2])) do redis.call('ZREM', P .. 'tag:' .. tag, e) end
  redis.call('HSET', key, 'node', '', 'status', 'offline', 'inprog', 0)
  redis.call('SREM', P .. 'emps:' .. node, e)
end
`;

function script(body: string): string {
  return PRELUDE + body;
}

/** ARGV[6..]: tag, priority, sender id, queue ('1'/'0'), body JSON, lease ms, expires at, this node. */
export const SUBMIT_SCRIPT = script(`
local tag, prio, sender, queue, body, timeout, expires, origin = ARGV[6], ARGV[7], ARGV[8], ARGV[9], ARGV[10], ARGV[11], ARGV[12], ARGV[13]
local e = choose(tag, prio, sender)
if not e and queue ~= '1' then return cjson.encode({result = 'none'}) end
local seq = redis.call('INCR', P .. 'seq')
local id = 't' .. seq
local msg = cjson.decode(body).msg_id
redis.call('HSET', P .. 'task:' .. id, 'body', body, 'seq', seq, 'msg', msg, 'tag', tag, 'prio', prio, 'from', sender, 'timeout', timeout,
  'expires', expires, 'state', 'storing', 'attempt', 0, 'since', NOW, 'created', NOW, 'origin', origin, 'emp', '', 'node', '')
redis.call('ZADD', P .. 'all', seq, id)
redis.call('SADD', P .. 'nodes', origin)
if e then
  local node = reserve(id, e, 1)
  return cjson.encode({result = 'assigned', id = id, assignment = assignment(id, e, node)})
end
-- Until the sender's ack it waits nowhere; its node's death still queues it (see REAP).
redis.call('SADD', P .. 'held:' .. origin, id)
return cjson.encode({result = 'queued', id = id})
`);

/** After the sender's ack: a queued task starts waiting. ARGV[6..]: task id, origin node, messages.db record id or ''. */
export const ACTIVATE_SCRIPT = script(`
local id, origin, record = ARGV[6], ARGV[7], ARGV[8]
local out = {}
if redis.call('HGET', P .. 'task:' .. id, 'state') ~= 'storing' then return cjson.encode({assignments = out}) end
redis.call('SREM', P .. 'held:' .. origin, id)
if record ~= '' then redis.call('HSET', P .. 'task:' .. id, 'record', record) end
local tag = enqueue(id, false)
dispatchWaiting(tag, nil, out)
return cjson.encode({assignments = out})
`);

/** Its write failed: the task is forgotten. ARGV[6..]: task id, origin node. */
export const ABANDON_SCRIPT = script(`
local id, origin = ARGV[6], ARGV[7]
local state = redis.call('HGET', P .. 'task:' .. id, 'state')
if state == 'in_progress' then release(id) end
if state == 'waiting' then take(id) end
redis.call('SREM', P .. 'held:' .. origin, id)
drop(id)
return cjson.encode({})
`);

/** ARGV[6..]: task id, employee id, attempt, 'done' or 'lost', lease loss reason. */
export const FINISH_SCRIPT = script(`
local out = {}
local r = finish(ARGV[6], ARGV[7], ARGV[8], ARGV[9], ARGV[10], out)
r.assignments = out
return cjson.encode(r)
`);

/** An employee authenticated on a node (or is written again). ARGV[6..]: id, node, capacity or '', tags JSON (with "*"), tasks it holds there, status. */
export const ONLINE_SCRIPT = script(`
local e, node, capacity, tags, inprog, status = ARGV[6], ARGV[7], ARGV[8], ARGV[9], ARGV[10], ARGV[11]
local key = P .. 'emp:' .. e
local old = redis.call('HMGET', key, 'tags', 'capacity', 'node')
if old[1] then for _, tag in ipairs(cjson.decode(old[1])) do redis.call('ZREM', P .. 'tag:' .. tag, e) end end
if old[3] and old[3] ~= '' and old[3] ~= node then redis.call('SREM', P .. 'emps:' .. old[3], e) end
if capacity == '' then capacity = old[2] or '1' end
redis.call('HSET', key, 'node', node, 'status', status, 'capacity', capacity, 'inprog', inprog, 'tags', tags)
redis.call('SADD', P .. 'emps:' .. node, e)
redis.call('SADD', P .. 'nodes', node)
rescore(e)
local out = {}
pump(e, out)
return cjson.encode({capacity = tonumber(capacity), assignments = out})
`);

/** ARGV[6..]: id, node. */
export const OFFLINE_SCRIPT = script(`
offline(ARGV[6], ARGV[7])
return cjson.encode({})
`);

/** A status frame. ARGV[6..]: id, node, status or '', capacity or ''. */
export const STATUS_SCRIPT = script(`
local e, node, status, capacity = ARGV[6], ARGV[7], ARGV[8], ARGV[9]
local key = P .. 'emp:' .. e
local out = {}
if redis.call('HGET', key, 'node') ~= node then return cjson.encode({assignments = out}) end
if status ~= '' then redis.call('HSET', key, 'status', status) end
if capacity ~= '' then redis.call('HSET', key, 'capacity', capacity) end
pump(e, out)
return cjson.encode({assignments = out})
`);

/** A free employee of this node looks for waiting work (the once-a-second safety net). ARGV[6]: id. */
export const PUMP_SCRIPT = script(`
local out = {}
pump(ARGV[6], out)
return cjson.encode({assignments = out})
`);

/**
 * A node that is gone (its node key expired; or this node at its own start and clean stop, with
 * ARGV[7] '1'): its employees leave, its in-progress tasks go back to the front of their queues
 * (or fail after the last attempt), tasks it had not yet acked start waiting. ARGV[6]: node.
 */
export const REAP_SCRIPT = script(`
local node, force = ARGV[6], ARGV[7]
if force ~= '1' and redis.call('EXISTS', NODEKEY .. node) == 1 then return cjson.encode({result = 'alive'}) end
local out, lost, tags = {}, {}, {}
for _, e in ipairs(redis.call('SMEMBERS', P .. 'emps:' .. node)) do offline(e, node) end
redis.call('DEL', P .. 'emps:' .. node)
for _, id in ipairs(redis.call('SMEMBERS', P .. 'held:' .. node)) do
  local t = redis.call('HMGET', P .. 'task:' .. id, 'state', 'node', 'attempt', 'tag', 'body', 'emp')
  if t[1] == 'storing' then
    tags[enqueue(id, false)] = true
  elseif t[1] == 'in_progress' and t[2] == node then
    release(id)
    if tonumber(t[3]) >= MAX then
      drop(id)
      table.insert(lost, {result = 'failed', id = id, emp = t[6], attempt = tonumber(t[3]), body = t[5]})
    else
      tags[enqueue(id, true)] = true
      table.insert(lost, {result = 'requeued', id = id, emp = t[6], attempt = tonumber(t[3]), body = t[5]})
    end
  end
end
redis.call('DEL', P .. 'held:' .. node)
redis.call('SREM', P .. 'nodes', node)
for tag in pairs(tags) do dispatchWaiting(tag, nil, out) end
return cjson.encode({result = 'reaped', lost = lost, assignments = out})
`);

/** Waiting tasks past their deadline, and leases their node did not end in time. */
export const SWEEP_SCRIPT = script(`
local expired, lost, out = {}, {}, {}
for _, id in ipairs(redis.call('ZRANGEBYSCORE', P .. 'expiry', '-inf', NOW, 'LIMIT', 0, 100)) do
  local t = redis.call('HMGET', P .. 'task:' .. id, 'state', 'body', 'attempt', 'record', 'origin')
  if t[1] == 'waiting' then
    take(id)
    drop(id)
    table.insert(expired, {id = id, body = t[2], attempt = tonumber(t[3]), record = t[4] or '', origin = t[5]})
  else
    redis.call('ZREM', P .. 'expiry', id)
  end
end
for _, id in ipairs(redis.call('ZRANGEBYSCORE', P .. 'leases', '-inf', NOW, 'LIMIT', 0, 100)) do
  local t = redis.call('HMGET', P .. 'task:' .. id, 'state', 'emp', 'attempt')
  if t[1] == 'in_progress' then
    table.insert(lost, finish(id, t[2], t[3], 'lost', 'timeout', out))
  else
    redis.call('ZREM', P .. 'leases', id)
  end
end
return cjson.encode({expired = expired, lost = lost, assignments = out})
`);
