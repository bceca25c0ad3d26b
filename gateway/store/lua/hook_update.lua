-- hook_update.lua: the step a lease holder took with a hook. A holder whose lease was taken over
-- (it was too slow, and another replica claimed the hook) changes nothing.
-- KEYS  1 hooks hash   2 due sorted set   3 bodies hash   4 failed sorted set (id, failed ms)
-- ARGV  1 payload   2 the task's final body (action 'deliver')
-- payload: id, lease, action, delay_ms (when it is due next), error, status (the task's final
--   status word), attempted (a delivery was tried), keep_ms and max_failed (failed hooks kept)
--   actions: 'poll' (still running: poll again), 'deliver' (final: keep the body, deliver now,
--   still under this lease), 'retry' (a delivery failed: try again), 'delivered' (forget it),
--   'failed' (give up: listed for operators, who may redeliver it)
-- Returns 1 when applied, 0 when the lease is not this holder's (or the hook is gone)
local now = clock()
local raw = redis.call('HGET', KEYS[1], p.id)
if not raw then return 0 end
local h = cjson.decode(raw)
if h.lease ~= p.lease then return 0 end
local action = p.action
if action == 'delivered' then
  redis.call('HDEL', KEYS[1], p.id)
  redis.call('HDEL', KEYS[3], p.id)
  redis.call('ZREM', KEYS[2], p.id)
  return 1
end
if p.error then h.error = p.error end
if p.attempted then h.attempts = h.attempts + 1 end
if action == 'poll' then
  h.polls = h.polls + 1
  h.lease = ''
elseif action == 'deliver' then
  h.polls = h.polls + 1
  h.state, h.started, h.status = 'delivering', now, p.status or ''
  redis.call('HSET', KEYS[3], p.id, ARGV[2])
elseif action == 'retry' then
  h.lease = ''
elseif action == 'failed' then
  h.state, h.failed, h.lease = 'failed', now, ''
else
  return redis.error_reply('hook_update: unknown action')
end
redis.call('HSET', KEYS[1], p.id, cjson.encode(h))
if action ~= 'failed' then
  redis.call('ZADD', KEYS[2], now + p.delay_ms, p.id)
  return 1
end
redis.call('ZREM', KEYS[2], p.id)
redis.call('ZADD', KEYS[4], now, p.id)
-- failed hooks are kept `keep_ms`, and at most `max_failed` of them (the oldest go first)
local old = redis.call('ZRANGEBYSCORE', KEYS[4], '-inf', now - p.keep_ms, 'LIMIT', 0, 100)
local excess = redis.call('ZCARD', KEYS[4]) - #old - p.max_failed
if excess > 0 then
  old = redis.call('ZRANGEBYSCORE', KEYS[4], '-inf', '+inf', 'LIMIT', 0, #old + math.min(excess, 100))
end
for _, id in ipairs(old) do
  redis.call('ZREM', KEYS[4], id)
  redis.call('HDEL', KEYS[1], id)
  redis.call('HDEL', KEYS[3], id)
end
return 1
