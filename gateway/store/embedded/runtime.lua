-- runtime.lua: the scripting environment of Redis 7.0, built once per EmbeddedRedis.
-- Python passes in the functions that cross into the keyspace. What Redis does in C
-- (script_lua.c, eval.c, lua_cjson.c) is mirrored here, so a script cannot tell the difference:
-- the same globals (read-only), redis.*, cjson, pcall turning error tables into strings, the
-- error handler that reports "script: <sha>, on @user_script:<line>.", and the conversion of a
-- script's return value into a reply.

local call, pcall_command, sha1hex, decode, describe, reply_error, reply_list, extend, log = ...

local type, next, select, tostring, tonumber, error, rawget, rawset, setmetatable, unpack =
      type, next, select, tostring, tonumber, error, rawget, rawset, setmetatable, unpack
local raw_pcall, raw_xpcall, loadstring, setfenv = pcall, xpcall, loadstring, setfenv
local floor, ceil, huge = math.floor, math.ceil, math.huge
local format, find, sub, gsub, byte = string.format, string.find, string.sub, string.gsub, string.byte
local concat = table.concat
local getinfo = debug.getinfo
local HERE = getinfo(1, 'S').source -- frames of this file are skipped when reporting errors
local BUG = {} -- key of a Python exception that is not a Redis error (a bug: re-raised)
local null = newproxy()

for _, name in ipairs{'python', 'os', 'io', 'package', 'require', 'dofile', 'loadfile',
                      'module', 'print', 'debug'} do
  _G[name] = nil
end

-- A Lua function that Lua sees as a C function, as Redis's own functions are: a caller's frame
-- stays on the stack even for `return f(...)` (a tail call to a Lua function would replace it),
-- and a string error gets the caller's position, as luaL_error gives it. The function runs in a
-- coroutine, resumed by coroutine.wrap's C function; a new coroutine replaces one that failed.
-- It must raise its errors at level 0 and must not yield.
local yield, wrap = coroutine.yield, coroutine.wrap
local function c_function(f)
  local meta = {__metatable = false}
  local spawn
  local function settle(ok, ...)
    if ok then return ... end
    meta.__call = spawn()
    error((...), 0)
  end
  local function body(_, ...)
    return body(yield(settle(raw_pcall(f, ...))))
  end
  function spawn() return wrap(body) end
  meta.__call = spawn()
  return setmetatable({}, meta)
end

-- Globals and libraries are read-only, and reading a missing global is an error.
local readonly_tables = setmetatable({}, {__mode = 'k'})
local function readonly_error()
  error('Attempt to modify a readonly table', 2)
end
local function readonly(t)
  local proxy = setmetatable({}, {__index = t, __newindex = readonly_error, __metatable = false})
  readonly_tables[proxy] = true
  return proxy
end
local globals = setmetatable({}, {__index = function(_, name)
  error("Script attempted to access nonexistent global variable '" .. tostring(name) .. "'", 2)
end})
local env = readonly(globals)

-- An error as Redis keeps it: {err = "CODE message"} (luaPushErrorBuff).
local function error_table(message)
  local code, text = 'ERR', message
  if byte(message, 1) == 45 then -- '-'
    local space = find(message, ' ', 1, true)
    if space then
      code, text = sub(message, 2, space - 1), sub(message, space + 1)
    else
      text = sub(message, 2)
    end
  end
  text = gsub(gsub(text, '^[\r\n]+', ''), '[\r\n]+$', '')
  return {err = code .. ' ' .. text}
end

-- A Python exception raised through a C boundary becomes what Redis would have raised there:
-- a Redis error (an error table) or a Lua error message (a string).
local function normalise(e)
  if type(e) == 'userdata' and e ~= null then
    local kind, message = describe(e)
    if kind == 1 then return {err = message} end
    if kind == 2 then return message end
  end
  return e
end

local function settle_pcall(ok, ...)
  if ok then return true, ... end
  local e = normalise((...))
  if type(e) == 'table' then
    local message = e.err
    if type(message) == 'string' or type(message) == 'number' then return false, message end
  end
  return false, e
end

-- pcall as Redis replaces it (luaRedisPcall): an error table comes back as its message
local function redis_pcall(f, ...)
  return settle_pcall(raw_pcall(f, ...))
end

local function redis_xpcall(f, handler)
  return raw_xpcall(f, function(e) return handler(normalise(e)) end)
end

local redis_loadstring = c_function(function(...)
  local ok, f, err = raw_pcall(loadstring, ...)
  if not ok then error(f, 0) end
  if f then setfenv(f, env) end
  return f, err
end)

local redis_rawset = c_function(function(t, ...)
  if readonly_tables[t] then error('Attempt to modify a readonly table', 0) end
  local ok, result = raw_pcall(rawset, t, ...)
  if not ok then error(result, 0) end
  return result
end)

-- redis.*
local function error_reply(...)
  local message = ...
  if select('#', ...) ~= 1 or type(message) ~= 'string' then
    return error_table('wrong number or type of arguments')
  end
  if byte(message, 1) ~= 45 then message = '-' .. message end
  return error_table(message)
end

local function status_reply(...)
  local message = ...
  if select('#', ...) ~= 1 or type(message) ~= 'string' then
    return error_table('wrong number or type of arguments')
  end
  return {ok = message}
end

local redis_log = c_function(function(...)
  local argc = select('#', ...)
  if argc < 2 then error(error_table('redis.log() requires two arguments or more.')) end
  local level = tonumber((...))
  if not level then error(error_table('First argument must be a number (log level).')) end
  if level < 0 or level > 3 then error(error_table('Invalid debug level.')) end
  local parts = {}
  for i = 2, argc do
    local part = select(i, ...)
    if type(part) == 'string' or type(part) == 'number' then parts[#parts + 1] = part end
  end
  log(level, concat(parts, ' '))
end)

local setresp = c_function(function(...)
  if select('#', ...) ~= 1 then error(error_table('redis.setresp() requires one argument.')) end
  local resp = tonumber((...))
  if resp ~= 2 and resp ~= 3 then error(error_table('RESP version must be 2 or 3.')) end
  if resp == 3 then error(error_table('RESP3 is not supported by the embedded store.')) end
end)

local redis = {
  call = call, pcall = pcall_command, error_reply = error_reply, status_reply = status_reply,
  log = redis_log, LOG_DEBUG = 0, LOG_VERBOSE = 1, LOG_NOTICE = 2, LOG_WARNING = 3,
  sha1hex = sha1hex, setresp = setresp, replicate_commands = function() return true end,
}

-- cjson.encode, as lua-cjson 2.1 in Redis: 14 significant digits, '/' escaped, a table is an
-- array when its keys are exactly 1..n (not too sparse), and objects follow the table's order.
local escapes = {['"'] = '\\"', ['\\'] = '\\\\', ['/'] = '\\/', ['\127'] = '\\u007f',
                 ['\b'] = '\\b', ['\t'] = '\\t', ['\n'] = '\\n', ['\f'] = '\\f', ['\r'] = '\\r'}
for i = 0, 31 do
  local c = string.char(i)
  if not escapes[c] then escapes[c] = format('\\u%04x', i) end
end
local ESCAPED = '[%z\1-\31"\\/\127]'

-- Pieces go into `buf` (joined once at the end): no intermediate string is built or interned.
-- Strings seen before (field names, mostly) are looked up instead of scanned.
local plain, plain_count = {}, 0
local function put_string(buf, n, s)
  if not plain[s] then
    if find(s, ESCAPED) then
      s = gsub(s, ESCAPED, escapes)
    elseif #s <= 64 then
      if plain_count >= 4096 then plain, plain_count = {}, 0 end
      plain[s], plain_count = true, plain_count + 1
    end
  end
  buf[n + 1], buf[n + 2], buf[n + 3] = '"', s, '"'
  return n + 3
end

local function number(n)
  if n ~= n or n == huge or n == -huge then
    error('Cannot serialise number: must not be NaN or Inf', 0)
  end
  return format('%.14g', n)
end

local encode_value

local function encode_table(t, depth, buf, n)
  depth = depth + 1
  if depth > 1000 then error(format('Cannot serialise, excessive nesting (%d)', depth), 0) end
  local max, items = 0, 0
  for k in next, t do
    if type(k) == 'number' and k >= 1 and floor(k) == k then
      if k > max then max = k <= 2147483647 and k or -2147483648 end -- C's (int) on x86
      items = items + 1
    else
      max = -1
      break
    end
  end
  if max > items * 2 and max > 10 then
    error('Cannot serialise table: excessively sparse array', 0)
  end
  if max > 0 then
    n = n + 1; buf[n] = '['
    for i = 1, max do
      if i > 1 then n = n + 1; buf[n] = ',' end
      n = encode_value(rawget(t, i), depth, buf, n)
    end
    n = n + 1; buf[n] = ']'
    return n
  end
  local open = '{'
  for k, v in next, t do
    if plain[k] then -- a string seen before: the usual key
      buf[n + 1], buf[n + 2], buf[n + 3] = open, '"', k
      n = n + 3
    else
      local kt = type(k)
      n = n + 1; buf[n] = open
      if kt == 'string' then
        n = put_string(buf, n, k) - 1
      elseif kt == 'number' then
        buf[n + 1], buf[n + 2] = '"', number(k)
        n = n + 2
      else
        error('Cannot serialise ' .. kt .. ': table key must be a number or string', 0)
      end
    end
    n = n + 1; buf[n] = '":'
    open = ','
    if plain[v] then
      buf[n + 1], buf[n + 2], buf[n + 3] = '"', v, '"'
      n = n + 3
    else
      n = encode_value(v, depth, buf, n)
    end
  end
  if open == '{' then n = n + 1; buf[n] = '{' end
  n = n + 1; buf[n] = '}'
  return n
end

function encode_value(v, depth, buf, n)
  local t = type(v)
  if t == 'string' then return put_string(buf, n, v) end
  n = n + 1
  if t == 'number' then buf[n] = number(v)
  elseif t == 'boolean' then buf[n] = v and 'true' or 'false'
  elseif t == 'nil' or v == null then buf[n] = 'null'
  elseif t == 'table' then return encode_table(v, depth, buf, n - 1)
  else error('Cannot serialise ' .. t .. ': type not supported', 0)
  end
  return n
end

local encode = c_function(function(...)
  if select('#', ...) ~= 1 then error("bad argument #1 to 'encode' (expected 1 argument)", 0) end
  local buf = {}
  return concat(buf, '', 1, encode_value((...), 0, buf, 0))
end)

local cjson = {encode = encode, decode = decode, null = null}

for _, name in ipairs{'assert', 'collectgarbage', 'error', 'gcinfo', 'getmetatable', 'ipairs',
                      'next', 'pairs', 'rawequal', 'rawget', 'select', 'setmetatable',
                      'tonumber', 'tostring', 'type', 'unpack', '_VERSION'} do
  rawset(globals, name, _G[name])
end
for name, lib in pairs{string = string, math = math, table = table, coroutine = coroutine,
                       redis = redis, cjson = cjson} do
  rawset(globals, name, readonly(lib))
end
rawset(globals, 'pcall', redis_pcall)
rawset(globals, 'xpcall', redis_xpcall)
rawset(globals, 'loadstring', redis_loadstring)
rawset(globals, 'rawset', redis_rawset)
rawset(globals, '_G', env)
getmetatable('').__index = rawget(globals, 'string') -- ("x"):upper() and string.upper agree

-- Running a script: KEYS and ARGV, the error handler, the reply.
local function handler(err)
  local level = 2
  local info = getinfo(level, 'Sl')
  while info and (info.what == 'C' or info.source == HERE) do
    level = level + 1
    info = getinfo(level, 'Sl')
  end
  local bug
  if type(err) == 'userdata' and err ~= null then
    local kind, message = describe(err)
    if kind == 1 then err = {err = message}
    elseif kind == 2 then err = {err = 'ERR ' .. message}
    else bug, err = err, {err = 'ERR ' .. tostring(err)}
    end
  elseif type(err) ~= 'table' then
    err = {err = 'ERR ' .. tostring(err)}
  end
  if info then
    err.source = info.source
    err.line = info.currentline
  end
  if bug then err[BUG] = bug end
  return err
end

local MIN_INTEGER = -9223372036854775808
local function integer(n)
  if n ~= n or n >= 9223372036854775808 or n < MIN_INTEGER then return MIN_INTEGER end
  if n < 0 then return ceil(n) end
  return floor(n)
end

local function list(items, n)
  if n <= 4000 then return reply_list(unpack(items, 1, n)) end
  local out = reply_list()
  for i = 1, n, 4000 do extend(out, unpack(items, i, i + 3999 < n and i + 3999 or n)) end
  return out
end

-- A Lua value as the reply Redis makes of it (luaReplyToRedisReply, RESP2).
local function convert(v)
  local t = type(v)
  if t == 'string' then return v end
  if t == 'number' then return integer(v) end
  if t == 'boolean' then if v then return 1 end return nil end
  if t ~= 'table' then return nil end
  local field = rawget(v, 'err')
  if type(field) == 'string' then return reply_error((gsub(field, '[\r\n]', ' '))) end
  field = rawget(v, 'ok')
  if type(field) == 'string' then return (gsub(field, '[\r\n]', ' ')) end
  field = rawget(v, 'double')
  if type(field) == 'number' then
    if field == huge then return 'inf' elseif field == -huge then return '-inf' end
    return format('%.17g', field)
  end
  field = rawget(v, 'big_number')
  if type(field) == 'string' then return field end
  field = rawget(v, 'verbatim_string')
  if type(field) == 'table' and type(rawget(field, 'format')) == 'string'
      and type(rawget(field, 'string')) == 'string' then
    return rawget(field, 'string')
  end
  local items, n = {}, 0
  field = rawget(v, 'map')
  if type(field) == 'table' then
    for key, value in next, field do
      items[n + 1], items[n + 2] = convert(key), convert(value)
      n = n + 2
    end
    return list(items, n)
  end
  field = rawget(v, 'set')
  if type(field) == 'table' then
    for key in next, field do
      n = n + 1
      items[n] = convert(key)
    end
    return list(items, n)
  end
  while true do
    local item = rawget(v, n + 1)
    if item == nil then break end
    n = n + 1
    items[n] = convert(item)
  end
  return list(items, n)
end

local function failure(err, sha)
  local message = err.err
  if type(message) ~= 'string' and type(message) ~= 'number' then message = 'ERR unknown error' end
  local source, line = err.source, err.line
  if (type(source) == 'string' or type(source) == 'number')
      and (type(line) == 'string' or type(line) == 'number') then
    message = message .. ' script: ' .. sha .. ', on ' .. source .. ':' .. line .. '.'
  end
  return false, (gsub(message, '[\r\n]', ' ')), rawget(err, BUG)
end

-- The script's reply: (true, 0, value), or (true, 1, ...) for an array of plain values (most
-- replies: no Python list is built in Lua), or (false, message, exception to re-raise or nil).
local SPECIAL = {'err', 'ok', 'double', 'big_number', 'verbatim_string', 'map', 'set'}
local function finish(sha, ok, result)
  if not ok then return failure(result, sha) end
  if type(result) ~= 'table' then return true, 0, convert(result) end
  for i = 1, #SPECIAL do
    if rawget(result, SPECIAL[i]) ~= nil then return true, 0, convert(result) end
  end
  local items, n = {}, 0
  while true do
    local item = rawget(result, n + 1)
    if item == nil then break end
    if type(item) == 'table' or n == 4000 then return true, 0, convert(result) end
    n = n + 1
    items[n] = convert(item)
  end
  return true, 1, unpack(items, 1, n)
end

local api = {}

-- Run a compiled script with its keys and arguments as varargs.
function api.run(fn, sha, nkeys, ...)
  rawset(globals, 'KEYS', nkeys > 0 and {unpack({...}, 1, nkeys)} or {})
  rawset(globals, 'ARGV', {select(nkeys + 1, ...)})
  return finish(sha, raw_xpcall(fn, handler))
end

-- The same, with keys and arguments already in tables (too many to pass as varargs).
function api.run_tables(fn, sha, keys, argv)
  rawset(globals, 'KEYS', keys)
  rawset(globals, 'ARGV', argv)
  return finish(sha, raw_xpcall(fn, handler))
end

function api.compile(source)
  local fn, err = loadstring(source, '@user_script')
  if not fn then return nil, err end
  setfenv(fn, env)
  return fn
end

-- luaL_where(L, 1) as seen from a Python function called by a script.
function api.where()
  local info = getinfo(3, 'Sl')
  if info and info.currentline > 0 then return info.short_src .. ':' .. info.currentline .. ': ' end
  return ''
end

function api.pack(...) return {...} end
function api.status(message) return {ok = message} end
function api.error(message) return {err = message} end
api.null = null

return api
