-- populations.lua: reads of one partition's chunked populations (RFM_POPULATION_LAYOUT=chunked;
-- the script is chunks.lua + this one; read only: it flushes nothing it did not change).
-- KEYS[1] the partition's meta (names the slot; every key read is in it)
-- ARGV[1] operation  ARGV[2..4] key prefixes of the last, freq, mon populations  ARGV[5...]:
--   'stats'            -> {customers, lowest last purchase | false, highest frequency | false,
--                          highest monetary | false}
--   'count' (kind, x)* -> {#(value of kind <= x), ...} (kind 1 last, 2 freq, 3 mon)
--   'range' (kind, lo, hi)* -> {id, ...}: the customers whose value of kind lies in a closed
--                          range ('-inf' / '+inf' allowed), each once, in first-found order
--   'ranks' r*         -> {id, last, ...} at the 0-based ranks r (ascending) of the recency
--                          population in (last purchase, id) order
--   'page' from n      -> {{id, ...}, chunks read}: the customers of the recency population's
--                          chunks from..from+n-1 in index order (fewer than n read: the last
--                          page; a page may hold no one, as the first chunk may be empty)
local op, bases = ARGV[1], {ARGV[2], ARGV[3], ARGV[4]}

local function bound(x)
  if x == '-inf' then return -math.huge end
  if x == '+inf' then return math.huge end
  return tonumber(x)
end

-- the lowest value of the first nonempty chunk, or the highest of the last: only the first
-- chunk ('') can be empty, since an emptied chunk after it merges into its predecessor
local function edge(base, highest)
  local fences = highest and redis.call('ZRANGE', base .. 'i', -1, -1)
                 or redis.call('ZRANGE', base .. 'i', 0, 1)
  local at = highest and -1 or 0
  for _, f in ipairs(fences) do
    local r = redis.call('ZRANGE', base .. 'c:' .. f, at, at, 'WITHSCORES')
    if #r > 0 then return tonumber(r[2]) end
  end
  return false
end

if op == 'stats' then
  return {pc_total(bases[1]), edge(bases[1], false), edge(bases[2], true), edge(bases[3], true)}
elseif op == 'count' then
  local counters, out = {}, {}
  for i = 5, #ARGV, 2 do
    local k = tonumber(ARGV[i])
    counters[k] = counters[k] or pc_counter(bases[k])
    out[#out + 1] = counters[k](tonumber(ARGV[i + 1]))
  end
  return out
elseif op == 'range' then
  local seen, ids = {}, {}
  for i = 5, #ARGV, 3 do
    local lo, hi = math.max(bound(ARGV[i + 1]), 0), math.min(bound(ARGV[i + 2]), 2 ^ 53 - 1)
    if lo <= hi then
      local found = pc_range(bases[tonumber(ARGV[i])], lo, hi)
      for j = 1, #found, 2 do
        if not seen[found[j]] then seen[found[j]] = true; ids[#ids + 1] = found[j] end
      end
    end
  end
  return ids
elseif op == 'ranks' then
  local ranks = {}
  for i = 5, #ARGV do ranks[#ranks + 1] = tonumber(ARGV[i]) end
  return pc_at_ranks(bases[1], ranks)
elseif op == 'page' then
  local from, n = tonumber(ARGV[5]), tonumber(ARGV[6])
  local fences = redis.call('ZRANGE', bases[1] .. 'i', from, from + n - 1)
  if from == 0 and fences[1] ~= '' then table.insert(fences, 1, '') end
  local ids = {}
  for _, f in ipairs(fences) do
    for _, id in ipairs(redis.call('ZRANGE', bases[1] .. 'c:' .. f, 0, -1)) do ids[#ids + 1] = id end
  end
  return {ids, #fences}
end
return redis.error_reply('unknown operation ' .. tostring(op))
