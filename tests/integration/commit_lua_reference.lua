-- THE REFERENCE for tests/integration/test_commit_lua_differential.py, not used by the
-- service: state/lua/commit.lua as of dd2f4d9, which made one Redis call per command in the
-- order of the writes. The current script gathers commands into variadic calls and must leave
-- exactly the state this one leaves.
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
-- ARGV[2] JSON {"meta": {field: value},
--               "writes": [[id, due, null | [last, freq, mon] | false, value | null,
--                           old segment, new segment]],
--               "outbox": [[kind, text, record key | null]],
--               "model": null | [version, snapshot JSON]}
--   a write with value null writes the due time only, keeping the earlier of two;
--   due "" = none (removed); population false = not scored (removed from the sorted sets);
--   segments "" = none (the old one is what the caller read at the expected seq).
--   Numbers travel as strings (exact in any width).
--   outbox kind: "c" segment change | "d" dead letter.
-- Returns the new seq.  Errors "CONFLICT <stored seq>" when the stored seq is not ARGV[1].

local stored = tonumber(redis.call('HGET', KEYS[1], 'seq') or '-1')
if stored ~= tonumber(ARGV[1]) then
  return redis.error_reply('CONFLICT ' .. string.format('%.0f', stored))
end
local p = cjson.decode(ARGV[2])
for field, value in pairs(p.meta) do redis.call('HSET', KEYS[1], field, value) end
for _, w in ipairs(p.writes) do
  local id, due, pop, value = w[1], w[2], w[3], w[4]
  if value == cjson.null then
    if due == '' then redis.call('ZREM', KEYS[5], id) else redis.call('ZADD', KEYS[5], 'LT', due, id) end
  else
    if due == '' then redis.call('ZREM', KEYS[5], id) else redis.call('ZADD', KEYS[5], due, id) end
    if pop == false then
      redis.call('ZREM', KEYS[2], id); redis.call('ZREM', KEYS[3], id); redis.call('ZREM', KEYS[4], id)
    else
      redis.call('ZADD', KEYS[2], pop[1], id); redis.call('ZADD', KEYS[3], pop[2], id)
      redis.call('ZADD', KEYS[4], pop[3], id)
    end
    local old, new = w[5], w[6]
    if old ~= new then
      if old ~= '' then redis.call('HINCRBY', KEYS[6], old, -1) end
      if new ~= '' then redis.call('HINCRBY', KEYS[6], new, 1) end
    end
    redis.call('SET', ARGV[3] .. id, value)
  end
end
for _, entry in ipairs(p.outbox) do
  if entry[3] == nil or entry[3] == cjson.null then
    redis.call('XADD', KEYS[7], '*', 'k', entry[1], 'v', entry[2])
  else
    redis.call('XADD', KEYS[7], '*', 'k', entry[1], 'v', entry[2], 'key', entry[3])
  end
end
if p.model ~= cjson.null and p.model ~= nil then
  redis.call('SET', KEYS[8], p.model[2])
  redis.call('SET', KEYS[9], p.model[1])
end
redis.call('HSET', KEYS[1], 'seq', string.format('%.0f', stored + 1))
return stored + 1
