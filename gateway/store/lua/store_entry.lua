-- store_entry.lua: write an organisation-scoped cache entry and/or release its flight lock
-- (the part of finish.lua and cancel.lua that lives in the entry's own slot on Redis Cluster).
-- KEYS 1 cache entry   2 flight lock   ARGV 2 the entry
-- payload: ticket, cache_ttl_ms (store ARGV[2]), release (the lock, if this ticket holds it)
if p.cache_ttl_ms then redis.call('SET', KEYS[1], ARGV[2], 'PX', p.cache_ttl_ms) end
if p.release and redis.call('GET', KEYS[2]) == p.ticket then redis.call('DEL', KEYS[2]) end
return 1
