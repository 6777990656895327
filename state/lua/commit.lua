-- commit.lua: write one planned step of one partition atomically, compare-and-set on the
-- partition's commit sequence (meta field seq, +1 per commit): the customers' new stored
-- values, published segments (with the per-segment counts), population sorted sets and due
-- times, the partition's meta fields, and the outbox entries of the changes and dead letters.
-- The caller computed all of it from what it read at sequence ARGV[1]; if another writer
-- committed since, nothing is written.
--
-- KEYS[1] meta  KEYS[2] z:last  KEYS[3] z:freq  KEYS[4] z:mon  KEYS[5] due  KEYS[6] segcount
-- KEYS[7] outbox  KEYS[8] model  KEYS[9] model:version
-- ARGV[1] expected seq (-1 when none)  ARGV[3] customer key prefix: a customer's string is
--   ARGV[3] .. id, in the partition's slot like every key here (not declared one by one:
--   packing hundreds of key arguments cost the worker more than the rest of the commit)
-- ARGV[2] MessagePack {"meta": {field: value},
--                      "writes": [[id, due, [last, freq, mon] | false, value | false,
--                                  old segment, new segment]],
--                      "outbox": [[kind, text, record key | false]],
--                      "model": false | [version, snapshot JSON]}
--   a write with value false writes the due time only, keeping the earlier of two;
--   due "" = none (removed); population false = not scored (removed from the sorted sets);
--   segments "" = none (the old one is what the caller read at the expected seq).
--   Numbers travel as strings (exact in any width). false, not nil, marks what is absent
--   (a nil would end the Lua array). MessagePack, not JSON: cmsgpack copies the strings
--   (values, change texts) as they are, where cjson unescaped every quote of them (1.1-2.4 ms
--   of Redis time per 1,000 writes and changes).
--   outbox kind: "c" segment change | "d" dead letter.
-- Returns the new seq.  Errors "CONFLICT <stored seq>" when the stored seq is not ARGV[1].

local stored = tonumber(redis.call('HGET', KEYS[1], 'seq') or '-1')
if stored ~= tonumber(ARGV[1]) then
  return redis.error_reply('CONFLICT ' .. string.format('%.0f', stored))
end
local p = cmsgpack.unpack(ARGV[2])
for field, value in pairs(p.meta) do redis.call('HSET', KEYS[1], field, value) end

-- The customers' commands are gathered by kind and sent as variadic calls (ZADD key s1 m1 s2
-- m2 ..., ZREM, MSET, one HINCRBY per segment): a few calls per step instead of ~7 per
-- customer, which was most of the script's time. Commands of one kind on different customers
-- commute; a customer written twice in one commit first flushes what was gathered, so its own
-- writes keep their order.
local CHUNK = 1000  -- members per call (unpack's limit is ~8000 values)
local due_set, due_lt, due_rem, pop_rem, values = {}, {}, {}, {}, {}
local pop_add = {{}, {}, {}}
local seg_delta, seen = {}, {}
local function send(cmd, key, opt, items, stride)
  local step = CHUNK * stride
  for i = 1, #items, step do
    local j = math.min(i + step - 1, #items)
    if key == nil then redis.call(cmd, unpack(items, i, j))
    elseif opt == nil then redis.call(cmd, key, unpack(items, i, j))
    else redis.call(cmd, key, opt, unpack(items, i, j)) end
  end
end
local function flush()
  send('ZADD', KEYS[5], nil, due_set, 2); send('ZADD', KEYS[5], 'LT', due_lt, 2)
  send('ZREM', KEYS[5], nil, due_rem, 1)
  for k = 1, 3 do
    send('ZREM', KEYS[k + 1], nil, pop_rem, 1); send('ZADD', KEYS[k + 1], nil, pop_add[k], 2)
  end
  send('MSET', nil, nil, values, 2)
  for segment, delta in pairs(seg_delta) do redis.call('HINCRBY', KEYS[6], segment, delta) end
  due_set, due_lt, due_rem, pop_rem, values = {}, {}, {}, {}, {}
  pop_add = {{}, {}, {}}
  seg_delta, seen = {}, {}
end
local function push(list, a, b)
  list[#list + 1] = a
  if b ~= nil then list[#list + 1] = b end
end

for _, w in ipairs(p.writes) do
  local id, due, pop, value = w[1], w[2], w[3], w[4]
  if seen[id] then flush() end
  seen[id] = true
  if value == false then
    if due == '' then push(due_rem, id) else push(due_lt, due, id) end
  else
    if due == '' then push(due_rem, id) else push(due_set, due, id) end
    if pop == false then
      push(pop_rem, id)
    else
      for k = 1, 3 do push(pop_add[k], pop[k], id) end
    end
    local old, new = w[5], w[6]
    if old ~= new then
      if old ~= '' then seg_delta[old] = (seg_delta[old] or 0) - 1 end
      if new ~= '' then seg_delta[new] = (seg_delta[new] or 0) + 1 end
    end
    push(values, ARGV[3] .. id, value)
  end
end
flush()
for _, entry in ipairs(p.outbox) do
  if entry[3] == false then
    redis.call('XADD', KEYS[7], '*', 'k', entry[1], 'v', entry[2])
  else
    redis.call('XADD', KEYS[7], '*', 'k', entry[1], 'v', entry[2], 'key', entry[3])
  end
end
if p.model then
  redis.call('SET', KEYS[8], p.model[2])
  redis.call('SET', KEYS[9], p.model[1])
end
redis.call('HSET', KEYS[1], 'seq', string.format('%.0f', stored + 1))
return stored + 1
