-- Recover the jobs of workers whose heartbeat has expired. Atomic and
-- idempotent, so every worker can run it without a leader: a second run finds
-- nothing left to move.
--
-- KEYS[1] <p>:workers (sorted set of worker id by last beat, Redis time in ms)
-- KEYS[2] <p>:queue
-- ARGV[1] prefix   ARGV[2] a beat older than this (ms) is suspect
--
-- A suspect worker is dead only if its heartbeat key <p>:worker:<id> is gone
-- (it has a TTL): a worker whose heartbeat is back is never reaped. Its
-- processing list goes back to the HEAD of the queue in the order the jobs
-- were taken, one LMOVE at a time (it checks both lists' types before it
-- moves anything, so a job is never lost between them). Time is Redis' own
-- (TIME), never a worker's clock. Keys are built here from the prefix, so
-- this script is for a single Redis (not Cluster).
-- Returns {jobs moved, workers reaped}.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local suspects = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now - tonumber(ARGV[2]))
local moved, reaped = 0, 0
for _, id in ipairs(suspects) do
  if redis.call('EXISTS', ARGV[1] .. ':worker:' .. id) == 0 then
    local processing = ARGV[1] .. ':processing:' .. id
    while redis.call('LMOVE', processing, KEYS[2], 'RIGHT', 'LEFT') do
      moved = moved + 1
    end
    redis.call('ZREM', KEYS[1], id)
    reaped = reaped + 1
  end
end
return {moved, reaped}
