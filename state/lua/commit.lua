-- commit.lua: write one planned step of one partition atomically, compare-and-set on the
-- partition's commit sequence (meta field seq, +1 per commit): the customers' new stored
-- values, published segments (with the per-segment counts), population sorted sets and due
-- times, the partition's meta fields, and the outbox entries of the changes and dead letters.
-- The caller computed all of it from what it read at sequence ARGV[1]; if another writer
-- committed since, nothing is written.
--
-- KEYS[1] meta  KEYS[2] z:last  KEYS[3] z:freq  KEYS[4] z:mon  KEYS[5] due  KEYS[6] segcount
-- KEYS[7] outbox  KEYS[8] model  KEYS[9] model:version
-- ARGV[1] expected seq (-1 when none)
-- ARGV[2] MessagePack {"meta": {field: value},
--                      "keyprefix": the customers' key prefix (a customer's string is
--                                   keyprefix .. id, in the partition's slot like every key
--                                   here; not declared one by one: packing hundreds of key
--                                   arguments cost the worker more than the rest of the commit),
--                      "runs": [[due ZADD (due, id) pairs, due ZADD LT pairs, due ZREM ids,
--                                population ZREM ids, z:last pairs, z:freq pairs, z:mon pairs,
--                                {id, value, ...}, chunked removals of last, freq, mon
--                                (old value, id) pairs, {segment, net change, ...}]],
--                      "outbox": [[kind, text, record key | false]],
--                      "model": false | [version, snapshot JSON],
--                      "chunks": false | [key prefix of the last, freq, mon chunked populations]}
--   With "chunks" (RFM_POPULATION_LAYOUT=chunked; the script is then chunks.lua + this one) the
--   populations are chunks.lua's: each run removes the (old value, id) pairs, then adds the
--   new ones; KEYS[2..4] are not used. A customer not found at its old value (a population
--   written otherwise) is looked for in every chunk, so it is not left in two. A customer
--   written as new (no old values) is not looked for: one whose value was deleted outside
--   the service keeps its old entries too (README "Limits"; forget.lua removes every copy).
--   The caller (RedisStore.commit, state.store.commit_runs) gathered the customers' writes by
--   command: commands of one kind on different customers commute, so each kind of a run is
--   one variadic call (a few calls per step instead of ~7 per customer); a customer written
--   twice starts a new run, so its writes keep their order. Due-only writes (ZADD LT) keep
--   the earlier of two due times. Numbers travel as strings (exact in any width). false, not
--   nil, marks what is absent (a nil would end the Lua array). MessagePack, not JSON: cmsgpack
--   copies the strings (values, change texts) as they are, where cjson unescaped every quote
--   of them (1.1-2.4 ms of Redis time per 1,000 writes and changes).
--   outbox kind: "c" segment change | "d" dead letter.
-- Returns the new seq.  Errors "CONFLICT <stored seq>" when the stored seq is not ARGV[1].

local stored = tonumber(redis.call('HGET', KEYS[1], 'seq') or '-1')
if stored ~= tonumber(ARGV[1]) then
  return redis.error_reply('CONFLICT ' .. string.format('%.0f', stored))
end
local p = cmsgpack.unpack(ARGV[2])
for field, value in pairs(p.meta) do redis.call('HSET', KEYS[1], field, value) end

local CHUNK = 1000  -- members per call (unpack's limit is ~8000 values)
local function send(cmd, key, opt, items, stride)
  local step = CHUNK * stride
  for i = 1, #items, step do
    local j = math.min(i + step - 1, #items)
    if key == nil then redis.call(cmd, unpack(items, i, j))
    elseif opt == nil then redis.call(cmd, key, unpack(items, i, j))
    else redis.call(cmd, key, opt, unpack(items, i, j)) end
  end
end
local prefix = p.keyprefix
for _, run in ipairs(p.runs) do
  send('ZADD', KEYS[5], nil, run[1], 2); send('ZADD', KEYS[5], 'LT', run[2], 2)
  send('ZREM', KEYS[5], nil, run[3], 1)
  for k = 1, 3 do
    if p.chunks then
      local base, gone, added = p.chunks[k], run[8 + k], run[4 + k]
      for _, id in ipairs(pc_remove_many(base, gone)) do pc_forget(base, id) end
      pc_add_many(base, added)
    else
      send('ZREM', KEYS[k + 1], nil, run[4], 1); send('ZADD', KEYS[k + 1], nil, run[4 + k], 2)
    end
  end
  local values = run[8]
  for i = 1, #values, 2 do values[i] = prefix .. values[i] end
  send('MSET', nil, nil, values, 2)
  local delta = run[12]
  for i = 1, #delta, 2 do redis.call('HINCRBY', KEYS[6], delta[i], delta[i + 1]) end
end
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
if p.chunks then pc_flush_all() end
redis.call('HSET', KEYS[1], 'seq', string.format('%.0f', stored + 1))
return stored + 1
