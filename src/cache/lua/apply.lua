-- Applies a batch of events to the read model, idempotently and atomically:
-- the users and the applied position of their partitions change together, so
-- a replayed event (at-least-once delivery, a rebalance, a restart) is skipped
-- and a reader that sees a position also sees the data it covers.
--
-- KEYS[1]   hash: partition -> offset of the last applied event
-- KEYS[2..] one key per event: the user's key, or KEYS[1] for a record that
--           only moves the position (one sent to the dead-letter topic)
-- ARGV      per event, in log order: partition, offset, value ('' = none)
--
-- Returns {applied, duplicates, skipped}: written, already present (a second
-- create of one id: the first in the log wins), and replays.
local applied, duplicates, skipped = 0, 0, 0
local positions = {}
local raw = {} -- offsets as sent: Lua would print large numbers as 1e+15
for i = 2, #KEYS do
  local j = (i - 2) * 3
  local partition, offset, value = ARGV[j + 1], tonumber(ARGV[j + 2]), ARGV[j + 3]
  local current = positions[partition]
  if current == nil then
    current = tonumber(redis.call('HGET', KEYS[1], partition) or '-1')
  end
  if offset > current then
    if value ~= '' then
      if redis.call('SET', KEYS[i], value, 'NX') then
        applied = applied + 1
      else
        duplicates = duplicates + 1
      end
    end
    positions[partition] = offset
    raw[partition] = ARGV[j + 2]
  else
    skipped = skipped + 1
  end
end
for partition, offset in pairs(raw) do
  redis.call('HSET', KEYS[1], partition, offset)
end
return {applied, duplicates, skipped}
