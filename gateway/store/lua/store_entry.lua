-- store_entry.lua: write an organisation-scoped cache entry and/or release its flight lock
-- (the part of finish.lua and cancel.lua that lives in the entry's own slot on Redis Cluster).
-- KEYS 1 cache entry   2 flight lock
-- ARGV 1 entry ('' = none)   2 ttl ms   3 ticket   4 release the lock if this ticket holds it
if ARGV[1] ~= '' then redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2]) end
if ARGV[4] == '1' and redis.call('GET', KEYS[2]) == ARGV[3] then redis.call('DEL', KEYS[2]) end
return 1
