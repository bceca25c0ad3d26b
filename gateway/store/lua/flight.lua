-- flight.lua: what a follower sees of a cache key being fetched by another request.
-- KEYS 1 cache entry   2 flight lock   (empty payload)
-- Returns {entry or false, entry ttl ms, lock held 1/0}
local entry = redis.call('GET', KEYS[1])
if entry then return {entry, redis.call('PTTL', KEYS[1]), 1} end
return {false, 0, redis.call('EXISTS', KEYS[2])}
