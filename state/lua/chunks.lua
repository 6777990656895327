-- chunks.lua: a population (customer id -> value: a recency, frequency or monetary
-- dimension of one partition) kept as chunks of at most PC_MAX customers, so that Redis keeps
-- each chunk as a listpack/ziplist sorted set (~20 B per member) instead of one skiplist
-- sorted set (~100 B per member; docs/performance.md "Twelfth pass").
--
-- Prepended to the scripts that use it (RedisStore loads "chunks.lua" + the script), so it
-- defines local functions only. A population lives under a key prefix `base`:
--   base .. 'i'         the index: a sorted set of fences, all of score 0, in lexicographic
--                       order; '' is the first chunk's fence
--   base .. 'c:' .. f   the chunk of fence f: a sorted set id -> value
--   base .. 'n'         the number of customers in the population
--   base .. 'g'         groups of consecutive chunks (at most PC_GMAX each): a sorted set of
--                       group fences like the index ('' first), each a chunk's fence
--   base .. 'gn'        hash: group fence -> customers in its chunks
--   base .. 'gc'        hash: group fence -> chunks in it
-- The groups are the second level of an order-statistic tree: a count #(value <= x) is the
-- customers of the groups before x's group, of the chunks of that group before x's chunk
-- (ZCARD each) and a ZCOUNT in x's chunk: ~50-100 Redis calls, not one per chunk.
-- A fence is pc_enc(value) .. id, a lower bound of its chunk's members in (value, id) order
-- (values are non-negative integers below 2^53, zero-padded to 16 digits, so that the
-- fences' byte order is that order, as the chunks' own member order is): every member of a
-- chunk is at or after its fence and before the next fence. Fences change only when a chunk
-- splits (the upper half moves to a new chunk, its first member as fence) or merges into its
-- predecessor (an underfull chunk after a removal).

local PC_MAX, PC_SPLIT, PC_MERGE, PC_GMAX = 128, 64, 32, 64

local function pc_enc(v)
  return string.format('%016.0f', v)
end

-- the fence of the chunk that holds (or would hold) (v, id)
local function pc_fence(base, v, id)
  return redis.call('ZREVRANGEBYLEX', base .. 'i', '[' .. pc_enc(v) .. id, '-', 'LIMIT', 0, 1)[1] or ''
end

-- the fence of the group that holds the chunk of fence (or key) c
local function pc_group(base, c)
  return redis.call('ZREVRANGEBYLEX', base .. 'g', '[' .. c, '-', 'LIMIT', 0, 1)[1] or ''
end

-- the chunks' fences of group g, in order
local function pc_group_chunks(base, g)
  local nxt = redis.call('ZRANGEBYLEX', base .. 'g', '(' .. g, '+', 'LIMIT', 0, 1)[1]
  local out = redis.call('ZRANGEBYLEX', base .. 'i', '[' .. g, nxt and ('(' .. nxt) or '+')
  if out[1] ~= g then table.insert(out, 1, g) end  -- '' before any index entry
  return out
end

local function pc_move(from, to)  -- every member of chunk `from` into chunk `to`; deletes from
  local m = redis.call('ZRANGE', from, 0, -1, 'WITHSCORES')
  local args = {}
  for i = 1, #m, 2 do args[#args + 1] = m[i + 1]; args[#args + 1] = m[i] end
  if #args > 0 then redis.call('ZADD', to, unpack(args)) end
  redis.call('DEL', from)
end

-- add a customer that is not in the population
local function pc_add(base, v, id)
  local f = pc_fence(base, v, id)
  local ck = base .. 'c:' .. f
  if f == '' then
    redis.call('ZADD', base .. 'i', 'NX', 0, '')
    if redis.call('ZADD', base .. 'g', 'NX', 0, '') == 1 then redis.call('HSET', base .. 'gc', '', 1) end
  end
  local g = pc_group(base, f)
  redis.call('ZADD', ck, v, id)
  redis.call('INCR', base .. 'n')
  redis.call('HINCRBY', base .. 'gn', g, 1)
  if redis.call('ZCARD', ck) <= PC_MAX then return end
  -- split: the upper half to a new chunk, in the same group
  local moved = redis.call('ZRANGE', ck, PC_SPLIT, -1, 'WITHSCORES')
  local nf = pc_enc(tonumber(moved[2])) .. moved[1]
  local args = {}
  for i = 1, #moved, 2 do args[#args + 1] = moved[i + 1]; args[#args + 1] = moved[i] end
  redis.call('ZADD', base .. 'c:' .. nf, unpack(args))
  redis.call('ZREMRANGEBYRANK', ck, PC_SPLIT, -1)
  redis.call('ZADD', base .. 'i', 0, nf)
  if redis.call('HINCRBY', base .. 'gc', g, 1) <= PC_GMAX then return end
  -- split the group: its upper half of chunks to a new group
  local chunks = pc_group_chunks(base, g)
  local half = math.floor(#chunks / 2)
  local ng, n = chunks[half + 1], 0
  for i = half + 1, #chunks do n = n + redis.call('ZCARD', base .. 'c:' .. chunks[i]) end
  redis.call('ZADD', base .. 'g', 0, ng)
  redis.call('HSET', base .. 'gn', ng, n)
  redis.call('HSET', base .. 'gc', ng, #chunks - half)
  redis.call('HINCRBY', base .. 'gn', g, -n)
  redis.call('HSET', base .. 'gc', g, half)
end

-- remove a customer stored with value v; returns 0 when it is not there
local function pc_remove(base, v, id)
  local f = pc_fence(base, v, id)
  local ck = base .. 'c:' .. f
  if redis.call('ZREM', ck, id) == 0 then return 0 end
  local g = pc_group(base, f)
  redis.call('DECR', base .. 'n')
  redis.call('HINCRBY', base .. 'gn', g, -1)
  if f == '' then return 1 end
  local n = redis.call('ZCARD', ck)
  if n >= PC_MERGE then return 1 end
  -- underfull: into its predecessor when that has room
  local prev = redis.call('ZREVRANGEBYLEX', base .. 'i', '(' .. f, '-', 'LIMIT', 0, 1)[1] or ''
  if n > 0 and redis.call('ZCARD', base .. 'c:' .. prev) + n > PC_MAX then return 1 end
  pc_move(ck, base .. 'c:' .. prev)
  redis.call('ZREM', base .. 'i', f)
  if g ~= f then  -- the predecessor is in the same group
    redis.call('HINCRBY', base .. 'gc', g, -1)
    return 1
  end
  -- f was its group's first chunk: its customers went to the previous group's last chunk,
  -- and the group is now named after its next chunk (or gone, if it had no other)
  local pg = pc_group(base, prev)
  redis.call('HINCRBY', base .. 'gn', pg, n)
  local left = tonumber(redis.call('HGET', base .. 'gn', g)) - n
  local chunks = tonumber(redis.call('HGET', base .. 'gc', g)) - 1
  redis.call('ZREM', base .. 'g', g)
  redis.call('HDEL', base .. 'gn', g)
  redis.call('HDEL', base .. 'gc', g)
  if chunks > 0 then
    local ng = redis.call('ZRANGEBYLEX', base .. 'i', '(' .. f, '+', 'LIMIT', 0, 1)[1]
    redis.call('ZADD', base .. 'g', 0, ng)
    redis.call('HSET', base .. 'gn', ng, left)
    redis.call('HSET', base .. 'gc', ng, chunks)
  end
  return 1
end

-- the fences of the chunks that may hold values in [lo, hi], in order
local function pc_fences(base, lo, hi)
  local first = pc_fence(base, lo, '')
  local out = redis.call('ZRANGEBYLEX', base .. 'i', '[' .. first, '(' .. pc_enc(hi + 1))
  if out[1] ~= first then table.insert(out, 1, first) end  -- '' before any index entry
  return out
end

-- a counter for one call: #(value <= x) for any x, with what it read kept for the next x
local function pc_counter(base)
  local groups = redis.call('ZRANGEBYLEX', base .. 'g', '-', '+')
  local before, sizes, total = {}, {}, 0  -- customers in the groups before each group
  if #groups > 0 then
    local n = redis.call('HMGET', base .. 'gn', unpack(groups))
    for i, gf in ipairs(groups) do before[gf] = total; total = total + tonumber(n[i] or 0) end
  end
  local function zcard(c)
    local n = sizes[c]
    if n == nil then n = redis.call('ZCARD', base .. 'c:' .. c); sizes[c] = n end
    return n
  end
  return function(x)
    local bound = '(' .. pc_enc(x + 1)
    local c = redis.call('ZREVRANGEBYLEX', base .. 'i', bound, '-', 'LIMIT', 0, 1)[1] or ''
    local g = pc_group(base, c)
    local count = before[g] or 0
    if c ~= g then
      for _, f in ipairs(redis.call('ZRANGEBYLEX', base .. 'i', '[' .. g, '(' .. c)) do
        count = count + zcard(f)
      end
    end
    return count + redis.call('ZCOUNT', base .. 'c:' .. c, '-inf', x)
  end
end

-- how many customers have a value <= x
local function pc_count_le(base, x)
  return pc_counter(base)(x)
end

-- ids and values of the customers with lo <= value <= hi, in (value, id) order
local function pc_range(base, lo, hi)
  local out = {}
  for _, f in ipairs(pc_fences(base, lo, hi)) do
    for _, x in ipairs(redis.call('ZRANGEBYSCORE', base .. 'c:' .. f, lo, hi, 'WITHSCORES')) do
      out[#out + 1] = x
    end
  end
  return out
end

-- id and value at each 0-based rank of `ranks` (ascending) in (value, id) order
local function pc_at_ranks(base, ranks)
  local out, k, seen = {}, 1, 0
  local fences = redis.call('ZRANGEBYLEX', base .. 'i', '-', '+')
  if #fences == 0 then fences = {''} end
  for _, f in ipairs(fences) do
    if k > #ranks then break end
    local ck = base .. 'c:' .. f
    local n = redis.call('ZCARD', ck)
    while k <= #ranks and ranks[k] < seen + n do
      local r = redis.call('ZRANGE', ck, ranks[k] - seen, ranks[k] - seen, 'WITHSCORES')
      out[#out + 1] = r[1]; out[#out + 1] = r[2]
      k = k + 1
    end
    seen = seen + n
  end
  return out
end
