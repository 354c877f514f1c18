-- wrk script: stop after BENCH_REQUESTS responses (one wrk thread), for fixed-count profiles.
local limit = tonumber(os.getenv("BENCH_REQUESTS") or "1000")
local seen = 0
function response(status, headers, body)
    seen = seen + 1
    if seen >= limit then
        wrk.thread:stop()
    end
end
