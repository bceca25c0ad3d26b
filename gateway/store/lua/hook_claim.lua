-- hook_claim.lua: take the hooks whose time has come, each under a lease: its due time moves to
-- the lease's end, so that if the claimer dies another replica takes it up then. The lease is
-- named in the record (owner:claims); only its holder may move the hook on (hook_update.lua).
-- KEYS  1 hooks hash   2 due sorted set   3 bodies hash (id -> final task body)
-- payload: owner, lease_ms, limit
-- Returns {now ms, then (record, body or false) per hook claimed}
local now = clock()
local out = {now}
local ids = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', now, 'LIMIT', 0, p.limit)
for _, id in ipairs(ids) do
  local raw = redis.call('HGET', KEYS[1], id)
  if not raw then
    redis.call('ZREM', KEYS[2], id)
  else
    local h = cjson.decode(raw)
    h.claims = h.claims + 1
    h.lease = p.owner .. ':' .. h.claims
    raw = cjson.encode(h)
    redis.call('HSET', KEYS[1], id, raw)
    redis.call('ZADD', KEYS[2], now + p.lease_ms, id)
    out[#out + 1] = raw
    out[#out + 1] = redis.call('HGET', KEYS[3], id)
  end
end
return out
