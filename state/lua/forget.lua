-- forget.lua: erase one customer from its partition (a data-protection request), atomically:
-- the stored value, the population sorted sets, the due set, the per-segment count, and every
-- outbox entry not yet published that is about the customer (segment changes, and dead
-- letters whose record key is the customer id); then queue a tombstone for the compacted
-- customer-segments topic in the same outbox, so it is published after anything about the
-- customer that a publisher may have in flight: always with ARGV[2] = '1' (the customer's own
-- partition), else only where the customer existed or had entries (a partition with neither
-- has nothing about it in flight; a tombstone there would be one more delete for consumers).
-- The partition's commit sequence moves on, so a step computed before the erasure cannot
-- write the customer back.
-- KEYS[1] meta  KEYS[2] z:last  KEYS[3] z:freq  KEYS[4] z:mon  KEYS[5] due  KEYS[6] segcount
-- KEYS[7] the customer's value  KEYS[8] outbox      ARGV[1] customer id  ARGV[2] '1' | '0'
-- ARGV[3..5] key prefixes of the chunked populations (last, freq, mon): the script is
-- chunks.lua + this one, and erases the customer from both layouts (the one not used is
-- empty), so it needs no layout setting.
-- Returns {existed (0|1), outbox entries removed, tombstones queued (0|1)}.
local id = ARGV[1]
local value = redis.pcall('GET', KEYS[7])  -- an error reply when the key holds another type
local seg = nil
if type(value) == 'string' then  -- the stored value is [format, segment, ...] (state/codec.py): MessagePack,
  -- or JSON text (formats 1-2) when it starts with '['
  local decoder = string.sub(value, 1, 1) == '[' and cjson.decode or cmsgpack.unpack
  local ok, stored = pcall(decoder, value)
  if ok and type(stored) == 'table' and type(stored[2]) == 'string' then seg = stored[2] end
end
local existed = redis.call('DEL', KEYS[7])
for k = 2, 5 do redis.call('ZREM', KEYS[k], id) end
for k = 3, 5 do  -- every copy (a value deleted outside the service can leave one behind)
  while pc_forget(ARGV[k], id) == 1 do end
end
pc_flush_all()
-- only a segment that is counted: a value written by hand may name anything
if seg and seg ~= '' and redis.call('HEXISTS', KEYS[6], seg) == 1 then
  redis.call('HINCRBY', KEYS[6], seg, -1)
end
local removed = 0
for _, entry in ipairs(redis.call('XRANGE', KEYS[8], '-', '+')) do
  local fields = {}
  for i = 1, #entry[2], 2 do fields[entry[2][i]] = entry[2][i + 1] end
  -- a change's record key is its customer id; a dead letter's, its record's key
  if (fields['k'] == 'c' or fields['k'] == 'd') and fields['key'] == id then
    redis.call('XDEL', KEYS[8], entry[1])
    removed = removed + 1
  end
end
local tombstone = 0
if ARGV[2] == '1' or existed == 1 or removed > 0 then
  redis.call('XADD', KEYS[8], '*', 'k', 't', 'v', id)
  tombstone = 1
end
redis.call('HINCRBY', KEYS[1], 'seq', 1)
redis.call('HDEL', KEYS[1], 'tok')  -- the writer's cached customers are stale now
return {existed, removed, tombstone}
