-- command.lua: one Redis command on one key (the store's reads and small writes). Run as a script
-- so that every store operation takes the same path on Redis and on the embedded store.
-- KEYS 1 the key   payload: cmd, args
return redis.call(p.cmd, KEYS[1], unpack(p.args or {}))
