-- chunks.lua: a population (customer id -> value: a recency, frequency or monetary
-- dimension of one partition) kept as chunks of at most PC_MAX customers, so that Redis keeps
-- each chunk as a listpack/ziplist sorted set (~20 B per member) instead of one skiplist
-- sorted set (~100 B per member; docs/performance.md "Twelfth pass").
--
-- The service's chunked population layout (a new namespace's by default; commit.lua,
-- forget.lua and populations.lua prepend it); the other keeps one sorted set per population,
-- which is faster: ~60 B per customer for the three populations instead of ~310, for about
-- twice the Redis time per write and several times per count (docs/performance.md
-- "Eighteenth pass", "Twenty-sixth pass"). Tested against a sorted list
-- (tests/integration/test_chunks.py), measured (bench/layout_cost.py, bench/chunked_counts.py).
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
-- splits (the upper half moves to a new chunk, its first member as fence; a chunk given more
-- customers at once than it has room for is rewritten as several), or merges into its
-- predecessor (an underfull chunk after a removal).
-- The groups are the second level of an order-statistic tree: #(value <= x) is the customers
-- of the groups before x's group (one HMGET per call), of the chunks of that group before
-- x's chunk (one HMGET of sizes per group and call) and one ZCOUNT in x's chunk.
-- Writes go through a session per population and script call (pc_session: what it read of
-- the groups and chunks, kept in step with its own splits and merges), one ZADD or ZREM per
-- chunk for a batch of customers (pc_add_many, pc_remove_many); sizes and group counts are
-- written once (pc_flush) before a read and at the script's end.

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

-- a fence's value (a number; -inf for '') and id
local function pc_parse(f)
  if f == '' then return -math.huge, '' end
  return tonumber(string.sub(f, 1, 16)), string.sub(f, 17)
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

-- byte order of two strings (Redis's order of members and of lexicographic ranges; Lua's `<`
-- compares by the server's locale)
local function pc_bytes_lt(a, b)
  if a == b then return false end
  for i = 1, math.min(#a, #b) do
    local x, y = string.byte(a, i), string.byte(b, i)
    if x ~= y then return x < y end
  end
  return #a < #b
end

-- the last entry k of `list` (ascending entries {f, v, id}; list[1] a lower bound of
-- everything) with (list[k].v, list[k].id) <= (v, id)
local function pc_last_le(list, v, id)
  local lo, hi = 1, #list
  while lo < hi do
    local mid = math.floor((lo + hi + 1) / 2)
    local e = list[mid]
    if v < e.v or (v == e.v and pc_bytes_lt(id, e.id)) then hi = mid - 1 else lo = mid end
  end
  return lo
end

-- The write path. A script call that writes a population opens a session on it: the groups
-- (fences and customers: 2 calls) read once, each group's chunks (fences and sizes: 2 calls)
-- the first time a write reaches it, and then kept in step with every split and merge: a
-- customer's chunk is found by a binary search in Lua, and a batch is one ZADD or ZREM per
-- chunk (docs/performance.md "Twenty-sixth pass": each redis.call costs ~1 us besides the
-- command). Sizes and group counts are written by pc_flush, before a read and at the
-- script's end.
--   session: {groups = {group...}, dirty = {chunk -> true}, gdirty = {group -> true}}
--   group:   {f, v, id, n = customers, chunks = nil (not read yet) | {chunk...}}
--   chunk:   {f, v, id, n = customers, gone = true once merged away}
local pc_sessions = {}

local function pc_session(base)
  local s = pc_sessions[base]
  if s ~= nil then return s end
  s = {groups = {}, dirty = {}, gdirty = {}}
  local fences = redis.call('ZRANGEBYLEX', base .. 'g', '-', '+')
  local counts = pc_sliced('HMGET', base .. 'gn', fences)
  for i, f in ipairs(fences) do
    local v, id = pc_parse(f)
    s.groups[i] = {f = f, v = v, id = id, n = tonumber(counts[i]) or 0}
  end
  pc_sessions[base] = s
  return s
end

-- the fences of the chunks from fence g up to fence nxt (nil: the last), in order
local function pc_index_range(base, g, nxt)
  local out = redis.call('ZRANGEBYLEX', base .. 'i', '[' .. g, nxt and ('(' .. nxt) or '+')
  if out[1] ~= g then table.insert(out, 1, g) end  -- '' before any index entry
  return out
end

-- group gi's chunks, read the first time
local function pc_chunks(base, s, gi)
  local grp = s.groups[gi]
  if grp.chunks ~= nil then return grp.chunks end
  local nxt = s.groups[gi + 1]
  local fences = pc_index_range(base, grp.f, nxt and nxt.f)
  local sizes = redis.call('HMGET', base .. 's', unpack(fences))
  grp.chunks = {}
  for k, f in ipairs(fences) do
    local v, id = pc_parse(f)
    grp.chunks[k] = {f = f, v = v, id = id, n = tonumber(sizes[k]) or 0}
  end
  return grp.chunks
end

-- the group and chunk that hold (or would hold) (v, id)
local function pc_find(base, s, v, id)
  local gi = pc_last_le(s.groups, v, id)
  return gi, pc_last_le(pc_chunks(base, s, gi), v, id)
end

local function pc_flush(base)
  local s = pc_sessions[base]
  if s == nil then return end
  local sizes, counts, chunks = {}, {}, {}
  for c in pairs(s.dirty) do sizes[#sizes + 1] = c.f; sizes[#sizes + 1] = c.n end
  for grp in pairs(s.gdirty) do
    counts[#counts + 1] = grp.f; counts[#counts + 1] = grp.n
    chunks[#chunks + 1] = grp.f; chunks[#chunks + 1] = #grp.chunks
  end
  pc_sliced('HSET', base .. 's', sizes)
  pc_sliced('HSET', base .. 'gn', counts)
  pc_sliced('HSET', base .. 'gc', chunks)
  s.dirty, s.gdirty = {}, {}
end

local function pc_flush_all()
  for base in pairs(pc_sessions) do pc_flush(base) end
end

-- chunk c of group grp has d more customers
local function pc_resize(s, grp, c, d)
  c.n, grp.n = c.n + d, grp.n + d
  s.dirty[c], s.gdirty[grp] = true, true
end

-- the chunks' fences of group g, in order (as stored: for reads)
local function pc_group_chunks(base, g)
  return pc_index_range(base, g,
                        redis.call('ZRANGEBYLEX', base .. 'g', '(' .. g, '+', 'LIMIT', 0, 1)[1])
end

local function pc_move(from, to)  -- every member of chunk `from` into chunk `to`; deletes from
  local m = redis.call('ZRANGE', from, 0, -1, 'WITHSCORES')
  local args = {}
  for i = 1, #m, 2 do args[#args + 1] = m[i + 1]; args[#args + 1] = m[i] end
  if #args > 0 then redis.call('ZADD', to, unpack(args)) end
  redis.call('DEL', from)
end

-- a group of more than PC_GMAX chunks: its upper half of chunks to a new group (again, until
-- none has more)
local function pc_split_group(base, s, gi)
  local grp = s.groups[gi]
  if #grp.chunks <= PC_GMAX then return end
  local half, upper, n = math.floor(#grp.chunks / 2), {}, 0
  for i = half + 1, #grp.chunks do
    upper[#upper + 1] = grp.chunks[i]
    n = n + grp.chunks[i].n
    grp.chunks[i] = nil
  end
  local first = upper[1]
  local ng = {f = first.f, v = first.v, id = first.id, n = n, chunks = upper}
  grp.n = grp.n - n
  table.insert(s.groups, gi + 1, ng)
  redis.call('ZADD', base .. 'g', 0, ng.f)
  s.gdirty[grp], s.gdirty[ng] = true, true
  pc_split_group(base, s, gi + 1)
  pc_split_group(base, s, gi)
end

-- split chunk k of group gi: its upper half to a new chunk, in the same group
local function pc_split(base, s, gi, k)
  local grp = s.groups[gi]
  local c = grp.chunks[k]
  local ck = base .. 'c:' .. c.f
  local moved = redis.call('ZRANGE', ck, PC_SPLIT, -1, 'WITHSCORES')
  local v = tonumber(moved[2])
  local nc = {f = pc_enc(v) .. moved[1], v = v, id = moved[1], n = #moved / 2}
  local args = {}
  for i = 1, #moved, 2 do args[#args + 1] = moved[i + 1]; args[#args + 1] = moved[i] end
  redis.call('ZADD', base .. 'c:' .. nc.f, unpack(args))
  redis.call('ZREMRANGEBYRANK', ck, PC_SPLIT, -1)
  redis.call('ZADD', base .. 'i', 0, nc.f)
  c.n = PC_SPLIT
  table.insert(grp.chunks, k + 1, nc)
  s.dirty[c], s.dirty[nc], s.gdirty[grp] = true, true, true
  pc_split_group(base, s, gi)
end

-- chunk k of group gi and the customers `ids` (values `vals`) that belong in it, more than
-- it has room for: all of them, in order, rewritten as chunks of at most PC_SPLIT (c first,
-- the others new, after it in its group). Redis orders them: they are added to c, which
-- turns into a skiplist for a moment, read back in order, and c is written anew.
local function pc_refill(base, s, gi, k, ids, vals)
  local grp = s.groups[gi]
  local c = grp.chunks[k]
  local ck = base .. 'c:' .. c.f
  local args = {}
  for j = 1, #ids do args[#args + 1] = vals[j]; args[#args + 1] = ids[j] end
  pc_sliced('ZADD', ck, args)
  local all = redis.call('ZRANGE', ck, 0, -1, 'WITHSCORES')
  redis.call('DEL', ck)
  local total, before = #all / 2, c.n
  local blocks = math.ceil(total / PC_SPLIT)
  for b = 1, blocks do
    local from, to = math.floor((b - 1) * total / blocks) + 1, math.floor(b * total / blocks)
    local ch = c
    if b > 1 then
      local v, id = tonumber(all[2 * from]), all[2 * from - 1]
      ch = {f = pc_enc(v) .. id, v = v, id = id}
      redis.call('ZADD', base .. 'i', 0, ch.f)
      table.insert(grp.chunks, k + b - 1, ch)
    end
    local block = {}
    for i = from, to do block[#block + 1] = all[2 * i]; block[#block + 1] = all[2 * i - 1] end
    redis.call('ZADD', base .. 'c:' .. ch.f, unpack(block))
    ch.n = to - from + 1
    s.dirty[ch] = true
  end
  grp.n = grp.n + total - before
  s.gdirty[grp] = true
  pc_split_group(base, s, gi)
end

-- merge chunk k of group gi into its predecessor, when it is underfull (< PC_MERGE), not
-- the population's first, and the predecessor has room
local function pc_merge(base, s, gi, k)
  local grp = s.groups[gi]
  local c = grp.chunks[k]
  if c.n >= PC_MERGE or (gi == 1 and k == 1) then return end
  local pg, pk = gi, k - 1
  if k == 1 then pg = gi - 1; pk = #pc_chunks(base, s, pg) end
  local pgrp = s.groups[pg]
  local p = pgrp.chunks[pk]
  if p.n + c.n > PC_MAX then return end
  pc_move(base .. 'c:' .. c.f, base .. 'c:' .. p.f)
  redis.call('ZREM', base .. 'i', c.f)
  redis.call('HDEL', base .. 's', c.f)
  pc_resize(s, pgrp, p, c.n)
  grp.n = grp.n - c.n
  s.dirty[c], c.gone = nil, true
  table.remove(grp.chunks, k)
  if k > 1 then return end
  -- c was its group's first chunk: the group is named after its next chunk, or gone
  redis.call('ZREM', base .. 'g', grp.f)
  redis.call('HDEL', base .. 'gn', grp.f)
  redis.call('HDEL', base .. 'gc', grp.f)
  if #grp.chunks == 0 then
    s.gdirty[grp] = nil
    table.remove(s.groups, gi)
  else
    local first = grp.chunks[1]
    grp.f, grp.v, grp.id = first.f, first.v, first.id
    redis.call('ZADD', base .. 'g', 0, grp.f)
  end
end

-- the customers of `items` (flat (value, id) pairs, values as numbers or strings) by the
-- chunk that holds (or would hold) each: chunks in first-seen order, and per chunk its
-- group (until the next split or merge), ids and values
local function pc_bucket(base, s, items)
  local order, grps, ids, values = {}, {}, {}, {}
  for i = 1, #items, 2 do
    local v, id = tonumber(items[i]), items[i + 1]
    local gi, k = pc_find(base, s, v, id)
    local c = s.groups[gi].chunks[k]
    if ids[c] == nil then
      order[#order + 1] = c
      grps[c], ids[c], values[c] = s.groups[gi], {}, {}
    end
    ids[c][#ids[c] + 1] = id
    values[c][#values[c] + 1] = v
  end
  return order, grps, ids, values
end

-- add customers that are not in the population: `items` flat (value, id) pairs. One ZADD
-- per chunk (split if it reaches PC_MAX + 1), or the chunk rewritten when they are more
-- than it has room for (pc_refill).
local function pc_add_many(base, items)
  local s = pc_session(base)
  if #items == 0 then return end
  if #s.groups == 0 then  -- a first chunk, first group
    redis.call('ZADD', base .. 'i', 'NX', 0, '')
    redis.call('ZADD', base .. 'g', 'NX', 0, '')
    s.groups[1] = {f = '', v = -math.huge, id = '', n = 0,
                   chunks = {{f = '', v = -math.huge, id = '', n = 0}}}
  end
  local order, _, ids, values = pc_bucket(base, s, items)
  for _, c in ipairs(order) do  -- (its fence finds a chunk wherever splits moved it)
    local gi, k = pc_find(base, s, c.v, c.id)
    local list, vals = ids[c], values[c]
    if c.n + #list <= PC_MAX + 1 then
      local args = {}
      for j = 1, #list do args[#args + 1] = vals[j]; args[#args + 1] = list[j] end
      pc_resize(s, s.groups[gi], c, redis.call('ZADD', base .. 'c:' .. c.f, unpack(args)))
      if c.n > PC_MAX then pc_split(base, s, gi, k) end
    else
      pc_refill(base, s, gi, k, list, vals)
    end
  end
end

local function pc_add(base, v, id)  -- add one customer that is not in the population
  pc_add_many(base, {v, id})
end

-- remove customers stored with their values: `items` flat (value, id) pairs. One ZREM per
-- chunk; returns the ids of the chunks where fewer were found than asked (empty when all
-- were removed): those the caller may look for elsewhere (pc_forget).
local function pc_remove_many(base, items)
  local s = pc_session(base)
  local missing = {}
  if #s.groups == 0 then
    for i = 2, #items, 2 do missing[#missing + 1] = items[i] end
    return missing
  end
  local order, grps, ids = pc_bucket(base, s, items)
  for _, c in ipairs(order) do
    local list, removed = ids[c], 0
    for i = 1, #list, PC_SLICE do
      removed = removed + redis.call('ZREM', base .. 'c:' .. c.f,
                                     unpack(list, i, math.min(i + PC_SLICE - 1, #list)))
    end
    pc_resize(s, grps[c], c, -removed)
    if removed < #list then
      for _, id in ipairs(list) do missing[#missing + 1] = id end
    end
  end
  for _, c in ipairs(order) do  -- underfull chunks merged into their predecessors
    if not c.gone then pc_merge(base, s, pc_find(base, s, c.v, c.id)) end
  end
  return missing
end

-- remove a customer stored with value v; 0 when it is not there
local function pc_remove(base, v, id)
  return 1 - #pc_remove_many(base, {v, id})
end

-- remove `id` from chunk k of group gi; 0 when it is not there
local function pc_remove_at(base, s, gi, k, id)
  local grp = s.groups[gi]
  local c = grp.chunks[k]
  if redis.call('ZREM', base .. 'c:' .. c.f, id) == 0 then return 0 end
  pc_resize(s, grp, c, -1)
  pc_merge(base, s, gi, k)
  return 1
end

-- remove a customer whatever its value, by looking in every chunk (one ZSCORE each: for an
-- erasure, or a customer not found at the value it was said to have); 0 when it is in none
local function pc_forget(base, id)
  local s = pc_session(base)
  for gi = 1, #s.groups do
    for k, c in ipairs(pc_chunks(base, s, gi)) do
      if redis.call('ZSCORE', base .. 'c:' .. c.f, id) then return pc_remove_at(base, s, gi, k, id) end
    end
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
    gvalues[i] = pc_parse(g)
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
        values[k] = pc_parse(fences[k])
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
