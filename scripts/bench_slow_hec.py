#!/usr/bin/env python3
"""A Splunk HEC that answers slowly, for scripts/bench.sh: accepts every connection and every batch at once, but
answers {"text": "Success", "code": 0} only after --delay seconds (nginx cannot delay an answer).

    bench_slow_hec.py --port P [--delay 5]
"""
import argparse
import asyncio
import re
import signal

ANSWER = b'{"text": "Success", "code": 0}'


async def read_body(reader, head):
    length = re.search(rb"(?im)^content-length:\s*(\d+)", head)
    if length:
        await reader.readexactly(int(length.group(1)))
    elif re.search(rb"(?im)^transfer-encoding:[^\r]*chunked", head):
        while size := int((await reader.readuntil(b"\r\n")).split(b";")[0], 16):
            await reader.readexactly(size + 2)
        while await reader.readuntil(b"\r\n") != b"\r\n":  # trailers
            pass


async def serve(reader, writer, delay):
    try:
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            await read_body(reader, head)
            await asyncio.sleep(delay)
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
                         % (len(ANSWER), ANSWER))
            await writer.drain()
    except (asyncio.IncompleteReadError, ConnectionError):
        pass  # the bridge gave up waiting (its HEC timeout) and closed the connection
    finally:
        writer.close()


async def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--delay", type=float, default=5)
    args = parser.parse_args()
    server = await asyncio.start_server(lambda r, w: serve(r, w, args.delay), "127.0.0.1", args.port, backlog=1024)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    asyncio.run(main())
