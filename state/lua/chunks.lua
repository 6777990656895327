-- chunks.lua: a population (customer id -> value: a recency, frequency or monetary
-- dimension of one partition) kept as chunks of at most PC_MAX customers, so that Redis keeps
-- each chunk as a listpack/ziplist sorted set (~20 B per member) instead of one skiplist
-- sorted set (~100 B per member; docs/performance.md "Twelfth pass").
--
-- The service's populations with RFM_POPULATION_LAYOUT=chunked (commit.lua, forget.lua and
-- populations.lua prepend it); the default keeps one sorted set per population, which is
-- faster (docs/performance.md "Eighteenth pass": ~60 B per customer for the three populations
-- instead of ~310, for several times the Redis time per write and per count). Tested
-- against a sorted list (tests/integration/test_chunks.py), measured (bench/chunked_counts.py).
--
-- Prepended to the scripts that would use it (RedisStore loads "chunks.lua" + the script), so it
-- defines local functions only. A script that adds or removes calls pc_flush_all() before
-- it returns. A population lives under a key prefix `base`:
--   base .. 'i'         the index: a sorted set of fences, all of score 0, in lexicographic
--                       order; '' is the first chunk's fence
--   base .. 'c:' .. f   the chunk of fence f: a sorted set id -> value, of at most PC_MAX
--                       members between calls (PC_MAX + 1 for a moment: Redis keeps up to 128
--                       members as a listpack, converts the 129th to a skiplist and never
--                       back, so a chunk is split as it reaches 128; ids longer than 64 bytes
--                       make their chunk a skiplist too)
--   base .. 's'         hash: chunk fence -> its size
--   base .. 'g'         groups of consecutive chunks (at most PC_GMAX each): a sorted set of
--                       group fences like the index ('' first), each a chunk's fence
--   base .. 'gn'        hash: group fence -> customers in its chunks
--   base .. 'gc'        hash: group fence -> chunks in it
-- A fence is pc_enc(value) .. id, a lower bound of its chunk's members in (value, id) order
-- (values are non-negative integers below 2^53, zero-padded to 16 digits, so that the
-- fences' byte order is that order, as the chunks' own member order is): every member of a
-- chunk is at or after its fence and before the next fence. Fences change only when a chunk
-- splits (the upper half moves to a new chunk, its first member as fence) or merges into its
-- predecessor (an underfull chunk after a removal).
-- The groups are the second level of an order-statistic tree: #(value <= x) is the customers
-- of the groups before x's group (one HMGET per call), of the chunks of that group before
-- x's chunk (one HMGET of sizes per group and call) and one ZCOUNT in x's chunk.
-- Sizes and group counts are kept in the script's memory while it adds and removes, and
-- written once (pc_flush) before a split or merge, a read, and the script's end.

local PC_MAX, PC_SPLIT, PC_MERGE, PC_GMAX = 127, 64, 32, 64

-- redis.call(cmd, key, items...) in slices (Redis's Lua unpacks at most ~8,000 values: a
-- population of 500,000 customers in one partition has that many chunks), the replies joined
local PC_SLICE = 1000
local function pc_sliced(cmd, key, items)
  local out = {}
  for i = 1, #items, PC_SLICE do
    local r = redis.call(cmd, key, unpack(items, i, math.min(i + PC_SLICE - 1, #items)))
    if type(r) == 'table' then
      for _, x in ipairs(r) do out[#out + 1] = x end
    end
  end
  return out
end

local function pc_enc(v)
  return string.format('%016.0f', v)
end

-- the fence of the chunk that holds (or would hold) (v, id)
local function pc_fence(base, v, id)
  return redis.call('ZREVRANGEBYLEX', base .. 'i', '[' .. pc_enc(v) .. id, '-', 'LIMIT', 0, 1)[1] or ''
end

-- the value part of a fence, as a number ('' -> -inf)
local function pc_fence_value(f)
  if f == '' then return -math.huge end
  return tonumber(string.sub(f, 1, 16))
end

-- the last of `fences` (ascending) whose value is <= x: its position (fences[1] is a
-- lower bound of everything, so 1 at least). A fence (v, id) is below the key (x + 1, '')
-- exactly when v <= x, so numbers decide it without comparing strings (Lua compares them
-- by the server's locale).
local function pc_last_at_most(values, x)
  local lo, hi = 1, #values
  while lo < hi do
    local mid = math.floor((lo + hi + 1) / 2)
    if values[mid] <= x then lo = mid else hi = mid - 1 end
  end
  return lo
end

-- what this script call knows of each population: chunks' groups and sizes, and the sizes
-- and group counts it changed and has not written yet
local pc_seen = {}
local function pc_cache(base)
  local c = pc_seen[base]
  if c == nil then
    c = {group = {}, size = {}, dirty = {}, gdelta = {}, groups = nil, gvalues = nil}
    pc_seen[base] = c
  end
  return c
end

local function pc_flush(base)
  local c = pc_seen[base]
  if c == nil then return end
  local args = {}
  for f in pairs(c.dirty) do args[#args + 1] = f; args[#args + 1] = c.size[f] end
  pc_sliced('HSET', base .. 's', args)
  for g, d in pairs(c.gdelta) do
    if d ~= 0 then redis.call('HINCRBY', base .. 'gn', g, d) end
  end
  pc_seen[base] = nil
end

local function pc_flush_all()
  local bases = {}
  for base in pairs(pc_seen) do bases[#bases + 1] = base end
  for _, base in ipairs(bases) do pc_flush(base) end
end

-- the fence of the group that holds the chunk of fence c: found among the groups' values
-- (read once per call), or asked of Redis when a group fence has c's value (a tie, which
-- only the ids decide)
local function pc_group(base, c)
  local cache = pc_cache(base)
  local g = cache.group[c]
  if g ~= nil then return g end
  if cache.groups == nil then
    cache.groups = redis.call('ZRANGEBYLEX', base .. 'g', '-', '+')
    cache.gvalues = {}
    for i, gf in ipairs(cache.groups) do cache.gvalues[i] = pc_fence_value(gf) end
  end
  local values, v = cache.gvalues, pc_fence_value(c)
  if #values == 0 or c == '' then
    g = ''
  else
    local i = pc_last_at_most(values, v)
    if values[i] == v or (values[i + 1] ~= nil and values[i + 1] == v) then
      g = redis.call('ZREVRANGEBYLEX', base .. 'g', '[' .. c, '-', 'LIMIT', 0, 1)[1] or ''
    else
      g = cache.groups[i]
    end
  end
  cache.group[c] = g
  return g
end

local function pc_size(base, f)
  local cache = pc_cache(base).size
  local n = cache[f]
  if n == nil then n = redis.call('ZCARD', base .. 'c:' .. f); cache[f] = n end
  return n
end

local function pc_resize(base, f, g, d)  -- chunk f (of group g) has d more members
  local c = pc_cache(base)
  c.size[f] = pc_size(base, f) + d
  c.dirty[f] = true
  c.gdelta[g] = (c.gdelta[g] or 0) + d
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

-- split the chunk of fence f (in group g): its upper half to a new chunk, in the same group;
-- a group of more than PC_GMAX chunks gives its upper half of chunks to a new group
local function pc_split(base, f, g)
  pc_flush(base)
  local ck = base .. 'c:' .. f
  local moved = redis.call('ZRANGE', ck, PC_SPLIT, -1, 'WITHSCORES')
  local nf = pc_enc(tonumber(moved[2])) .. moved[1]
  local args = {}
  for i = 1, #moved, 2 do args[#args + 1] = moved[i + 1]; args[#args + 1] = moved[i] end
  redis.call('ZADD', base .. 'c:' .. nf, unpack(args))
  redis.call('ZREMRANGEBYRANK', ck, PC_SPLIT, -1)
  redis.call('ZADD', base .. 'i', 0, nf)
  redis.call('HSET', base .. 's', f, PC_SPLIT, nf, #moved / 2)
  if redis.call('HINCRBY', base .. 'gc', g, 1) <= PC_GMAX then return end
  local chunks = pc_group_chunks(base, g)
  local half = math.floor(#chunks / 2)
  local ng, n = chunks[half + 1], 0
  for _, s in ipairs(redis.call('HMGET', base .. 's', unpack(chunks, half + 1))) do
    n = n + tonumber(s)
  end
  redis.call('ZADD', base .. 'g', 0, ng)
  redis.call('HSET', base .. 'gn', ng, n)
  redis.call('HSET', base .. 'gc', ng, #chunks - half, g, half)
  redis.call('HINCRBY', base .. 'gn', g, -n)
end

-- merge the chunk of fence f (in group g, not '') into its predecessor, when that has room
local function pc_merge(base, f, g)
  local n = pc_size(base, f)
  local prev = redis.call('ZREVRANGEBYLEX', base .. 'i', '(' .. f, '-', 'LIMIT', 0, 1)[1] or ''
  if pc_size(base, prev) + n > PC_MAX then return end
  pc_flush(base)
  pc_move(base .. 'c:' .. f, base .. 'c:' .. prev)
  redis.call('ZREM', base .. 'i', f)
  redis.call('HDEL', base .. 's', f)
  redis.call('HINCRBY', base .. 's', prev, n)
  if g ~= f then  -- the predecessor is in the same group
    redis.call('HINCRBY', base .. 'gc', g, -1)
    return
  end
  -- f was its group's first chunk: its customers went to the previous group's last chunk,
  -- and the group is now named after its next chunk (or gone, if it had no other)
  local pg = pc_group(base, prev)
  pc_seen[base] = nil
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
end

-- add a customer that is not in the population
local function pc_add(base, v, id)
  local f = pc_fence(base, v, id)
  if f == '' and pc_cache(base).size[''] == nil then  -- a first chunk, first group
    redis.call('ZADD', base .. 'i', 'NX', 0, '')
    if redis.call('ZADD', base .. 'g', 'NX', 0, '') == 1 then redis.call('HSET', base .. 'gc', '', 1) end
  end
  local g = pc_group(base, f)
  pc_size(base, f)
  pc_resize(base, f, g, redis.call('ZADD', base .. 'c:' .. f, v, id))
  if pc_seen[base].size[f] > PC_MAX then pc_split(base, f, g) end
end

-- remove a customer stored with value v (from the chunk of fence f when given); returns 0
-- when it is not there
local function pc_remove(base, v, id, f)
  f = f or pc_fence(base, v, id)
  pc_size(base, f)
  if redis.call('ZREM', base .. 'c:' .. f, id) == 0 then return 0 end
  local g = pc_group(base, f)
  pc_resize(base, f, g, -1)
  if f ~= '' and pc_seen[base].size[f] < PC_MERGE then pc_merge(base, f, g) end
  return 1
end

-- remove a customer whatever its value, by looking in every chunk (one ZSCORE each: for an
-- erasure, or a customer not found at the value it was said to have); 0 when it is in none
local function pc_forget(base, id)
  local fences = redis.call('ZRANGE', base .. 'i', 0, -1)
  if fences[1] ~= '' then table.insert(fences, 1, '') end
  for _, f in ipairs(fences) do
    local v = redis.call('ZSCORE', base .. 'c:' .. f, id)
    if v then return pc_remove(base, tonumber(v), id, f) end
  end
  return 0
end

-- the fences of the chunks that may hold values in [lo, hi], in order
local function pc_fences(base, lo, hi)
  local first = pc_fence(base, lo, '')
  local out = redis.call('ZRANGEBYLEX', base .. 'i', '[' .. first, '(' .. pc_enc(hi + 1))
  if out[1] ~= first then table.insert(out, 1, first) end  -- '' before any index entry
  return out
end

-- how many customers the population holds
local function pc_total(base)
  pc_flush(base)
  local total = 0
  for _, n in ipairs(redis.call('HVALS', base .. 'gn')) do total = total + tonumber(n) end
  return total
end

-- a counter for one call: #(value <= x) for any x. It reads the groups (fences and counts)
-- once, each group it needs (its chunks' fences and sizes) once, and one ZCOUNT per x.
local function pc_counter(base)
  pc_flush(base)
  local groups = redis.call('ZRANGEBYLEX', base .. 'g', '-', '+')
  if #groups == 0 then return function(x) return 0 end end
  local gvalues, before, total = {}, {}, 0  -- customers in the groups before each group
  local n = pc_sliced('HMGET', base .. 'gn', groups)
  for i, g in ipairs(groups) do
    gvalues[i] = pc_fence_value(g)
    before[i] = total
    total = total + tonumber(n[i] or 0)
  end
  local loaded = {}  -- per group: {fences, their values, customers before each}
  local function group(i)
    local t = loaded[i]
    if t == nil then
      local fences = pc_group_chunks(base, groups[i])
      local values, below, sum = {}, {}, 0
      for k, size in ipairs(redis.call('HMGET', base .. 's', unpack(fences))) do
        values[k] = pc_fence_value(fences[k])
        below[k] = sum
        sum = sum + tonumber(size)
      end
      t = {fences, values, below}
      loaded[i] = t
    end
    return t
  end
  return function(x)
    local gi = pc_last_at_most(gvalues, x)
    local t = group(gi)
    local k = pc_last_at_most(t[2], x)
    return before[gi] + t[3][k] + redis.call('ZCOUNT', base .. 'c:' .. t[1][k], '-inf', x)
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
  pc_flush(base)
  local out, k, seen = {}, 1, 0
  local fences = redis.call('ZRANGEBYLEX', base .. 'i', '-', '+')
  if #fences == 0 then return out end
  local sizes = pc_sliced('HMGET', base .. 's', fences)
  for i, f in ipairs(fences) do
    if k > #ranks then break end
    local n = tonumber(sizes[i])
    while k <= #ranks and ranks[k] < seen + n do
      local r = redis.call('ZRANGE', base .. 'c:' .. f, ranks[k] - seen, ranks[k] - seen, 'WITHSCORES')
      out[#out + 1] = r[1]; out[#out + 1] = r[2]
      k = k + 1
    end
    seen = seen + n
  end
  return out
end
