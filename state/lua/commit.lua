-- commit.lua: write one planned step of one partition atomically, compare-and-set on the
-- partition's commit sequence (meta field seq, +1 per commit): the customers' new states,
-- published segments (with the per-segment counts), population sorted sets and due times,
-- the partition's meta fields, and the outbox entries of the changes and dead letters.
-- The caller computed all of it from what it read at sequence ARGV[1]; if another writer
-- committed since, nothing is written.
--
-- KEYS[1] meta  KEYS[2] z:last  KEYS[3] z:freq  KEYS[4] z:mon  KEYS[5] due  KEYS[6] segcount
-- KEYS[7] outbox  KEYS[8 ..] one hash per written customer
-- ARGV[1] expected seq (-1 when none)   ARGV[2] n customers   ARGV[3] n meta pairs
-- ARGV[4] n outbox entries              ARGV[5] n hash fields, then the field names
-- then    the meta field/value pairs
-- then    per customer: id, mode, due ('' = none), and for mode 's' (state) the recency,
--         frequency and monetary population values ('' = not scored: removed) and one value
--         per hash field ('' = deleted); mode 'd' (due only) keeps the earlier of two dues
-- then    2 values per outbox entry: kind ('c' segment change | 'd' dead letter), JSON text
-- Returns the new seq.  Errors "CONFLICT <stored seq>" when the stored seq is not ARGV[1].

local stored = tonumber(redis.call('HGET', KEYS[1], 'seq') or '-1')
if stored ~= tonumber(ARGV[1]) then
  return redis.error_reply('CONFLICT ' .. string.format('%.0f', stored))
end
local n, n_meta, n_out, n_fields = tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4]),
                                   tonumber(ARGV[5])
local fields = {}
for i = 1, n_fields do fields[i] = ARGV[5 + i] end
local a = 6 + n_fields
for _ = 1, n_meta do
  redis.call('HSET', KEYS[1], ARGV[a], ARGV[a + 1])
  a = a + 2
end
local seg_field = nil
for i, f in ipairs(fields) do if f == 'seg' then seg_field = i end end
for ci = 1, n do
  local key, id, mode, due = KEYS[7 + ci], ARGV[a], ARGV[a + 1], ARGV[a + 2]
  a = a + 3
  if mode == 'd' then
    if due == '' then redis.call('ZREM', KEYS[5], id) else redis.call('ZADD', KEYS[5], 'LT', due, id) end
  else
    if due == '' then redis.call('ZREM', KEYS[5], id) else redis.call('ZADD', KEYS[5], due, id) end
    local last, freq, mon = ARGV[a], ARGV[a + 1], ARGV[a + 2]
    a = a + 3
    if last == '' then
      redis.call('ZREM', KEYS[2], id); redis.call('ZREM', KEYS[3], id); redis.call('ZREM', KEYS[4], id)
    else
      redis.call('ZADD', KEYS[2], last, id); redis.call('ZADD', KEYS[3], freq, id)
      redis.call('ZADD', KEYS[4], mon, id)
    end
    local old = redis.call('HGET', key, 'seg') or ''
    local new = ARGV[a + seg_field - 1]
    if old ~= new then
      if old ~= '' then redis.call('HINCRBY', KEYS[6], old, -1) end
      if new ~= '' then redis.call('HINCRBY', KEYS[6], new, 1) end
    end
    local set, del = {}, {}
    for i = 1, n_fields do
      local v = ARGV[a + i - 1]
      if v == '' then del[#del + 1] = fields[i] else set[#set + 1] = fields[i]; set[#set + 1] = v end
    end
    a = a + n_fields
    if #del > 0 then redis.call('HDEL', key, unpack(del)) end
    if #set > 0 then redis.call('HSET', key, unpack(set)) end
  end
end
for _ = 1, n_out do
  redis.call('XADD', KEYS[7], '*', 'k', ARGV[a], 'v', ARGV[a + 1])
  a = a + 2
end
redis.call('HSET', KEYS[1], 'seq', string.format('%.0f', stored + 1))
return stored + 1
