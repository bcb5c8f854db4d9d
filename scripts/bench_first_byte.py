#!/usr/bin/env python3
"""Streaming first-byte delay, for scripts/bench.sh: how long after Circuit sends a stream's first event does its
first byte reach the client?

Two roles, each in its own process so that neither waits on the other's event loop:

- the fake Circuit (child process, asyncio): answers every POST .../chat/completions with `text/event-stream`
  (HTTP/1.1 keep-alive, chunked): the head and a first chat.completion.chunk event in one write, then a pause (so
  that the first event travels alone and nothing later can push it along), then the remaining events, a usage-only
  chunk and `data: [DONE]`. It reports when it sent the first event, with the request's number, over a pipe.
- the client (this process, blocking sockets): one keep-alive connection per target; round after round, one
  streamed chat request to each target in turn (the same moment's noise for all of them); notes when the first
  byte of each answer's body arrives and reads the answer to its end. The upstream puts the request's number in
  the events' id (chatcmpl-fb-N), which matches arrival with sending.

Two clocks, both reported:
- kernel socket timestamps (the figures printed, and the target's): the software timestamp the kernel gives the
  first event as it leaves the upstream's socket (SO_TIMESTAMPING, TX), against the one it gives the bytes as they
  reach the client's socket (SO_TIMESTAMPNS). Neither end's scheduling counts, only what lies between: loopback,
  and the proxy with its own scheduling.
- process clocks (`process` in the JSON): time.monotonic_ns() in the upstream once the write is handed to the
  socket (after drain), against the client's once its recv returns. On a loaded machine these measure the python
  processes as much as the proxy: the client's wake-up inflates them, and a receiver that runs before the sender
  notes its time makes them negative; the direct target shows how much.
Without kernel timestamps (not Linux) only the process clocks are measured and they are what is printed.

    bench_first_byte.py --upstream-port P --subkey KEY [--streams 300] [--pause-ms 20] [--out FILE] \\
        --target direct=http://127.0.0.1:P/openai/deployments/bench-first-byte/chat/completions \\
        --target bridge=http://127.0.0.1:B/v1/chat/completions

Prints one line per target (p50, p99, max in µs) and writes them as JSON to --out. Exits 1 if an answer was not
a complete 200 stream.
"""
import argparse
import asyncio
import json
import math
import multiprocessing
import os
import re
import signal
import socket
import struct
import sys
import time
import urllib.parse

WARMUP_ROUNDS = 20  # first connections, the bridge's first token and pool connection: not what is measured

# Linux's socket timestamping (the socket module does not name these).
SO_TIMESTAMPNS, SO_TIMESTAMPING = 35, 37
SOF_TIMESTAMPING_TX_SOFTWARE, SOF_TIMESTAMPING_SOFTWARE, SOF_TIMESTAMPING_OPT_TSONLY = 1 << 1, 1 << 4, 1 << 11
KERNEL_TIMESTAMPS = sys.platform.startswith("linux")


def timestamp(ancillary, kind):
    """The first timespec of a SCM_TIMESTAMPNS or SCM_TIMESTAMPING message, in ns (CLOCK_REALTIME)."""
    for level, type_, data in ancillary:
        if level == socket.SOL_SOCKET and type_ == kind and len(data) >= 16:
            seconds, nanoseconds = struct.unpack("qq", data[:16])
            return seconds * 1_000_000_000 + nanoseconds
    return None


def event(number, delta, finish=None):
    chunk = {"id": f"chatcmpl-fb-{number}", "object": "chat.completion.chunk", "created": 1764412245,
             "model": "gpt-4o", "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}
    return b"data: " + json.dumps(chunk).encode() + b"\n\n"


def chunked(data):
    return b"%x\r\n%s\r\n" % (len(data), data)


# --- The fake Circuit ------------------------------------------------------------------------------------------

def upstream(port, pause, pipe):
    signal.signal(signal.SIGINT, signal.SIG_DFL)  # Ctrl-C or the client's terminate(): go quietly
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    counter = iter(range(1, 1 << 62))
    head = (b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nCache-Control: no-cache\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n")

    def sent_timestamp(sock):
        """The kernel's TX timestamp of the write just made (loopback stamps it within the send call itself)."""
        stamp = None
        while True:  # take every report from the error queue: one left there keeps the socket signalling EPOLLERR
            try:
                _, ancillary, _, _ = sock.recvmsg(1, 1024, socket.MSG_ERRQUEUE | socket.MSG_DONTWAIT)
            except BlockingIOError:
                return stamp
            stamp = stamp or timestamp(ancillary, SO_TIMESTAMPING)

    async def serve(reader, writer):
        # A second handle on the connection's socket: asyncio's own does not offer recvmsg.
        sock = socket.socket(fileno=os.dup(writer.get_extra_info("socket").fileno()))
        try:
            while True:
                request = await reader.readuntil(b"\r\n\r\n")
                length = re.search(rb"(?im)^content-length:\s*(\d+)", request)
                await reader.readexactly(int(length.group(1)) if length else 0)
                number = next(counter)
                if KERNEL_TIMESTAMPS:  # for the first event only: the rest need no stamps
                    sock.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPING, SOF_TIMESTAMPING_TX_SOFTWARE
                                    | SOF_TIMESTAMPING_SOFTWARE | SOF_TIMESTAMPING_OPT_TSONLY)
                writer.write(head + chunked(event(number, {"role": "assistant", "content": "Hello"})))
                await writer.drain()
                after_write = time.monotonic_ns()
                stamp = None
                if KERNEL_TIMESTAMPS:  # read before switching off: the kernel then leaves the stamp out of the report
                    stamp = sent_timestamp(sock)
                    sock.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPING, 0)
                pipe.send((number, after_write, stamp))
                await asyncio.sleep(pause)
                rest = event(number, {"content": " from"}) + event(number, {"content": " the"})
                rest += event(number, {"content": " benchmark"}) + event(number, {}, "stop")
                rest += (b'data: {"id": "chatcmpl-fb-%d", "object": "chat.completion.chunk", "created": 1764412245, '
                         b'"model": "gpt-4o", "choices": [], "usage": {"prompt_tokens": 11, "completion_tokens": 4, '
                         b'"total_tokens": 15}}\n\ndata: [DONE]\n\n' % number)
                writer.write(chunked(rest) + b"0\r\n\r\n")
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            sock.close()
            writer.close()

    async def main():
        server = await asyncio.start_server(serve, "127.0.0.1", port, backlog=64)
        pipe.send("ready")
        async with server:
            await server.serve_forever()

    asyncio.run(main())


# --- The client ------------------------------------------------------------------------------------------------

class Target:
    """One keep-alive connection to one URL; reconnects when an answer was close-delimited or the peer closed."""

    def __init__(self, name, url, subkey):
        self.name, self.url = name, urllib.parse.urlsplit(url)
        body = json.dumps({"model": "bench-first-byte", "messages": [{"role": "user", "content": "hi"}],
                           "stream": True}).encode()
        self.request = (f"POST {self.url.path or '/'} HTTP/1.1\r\nHost: {self.url.netloc}\r\n"
                        f"Content-Type: application/json\r\nAccept: text/event-stream\r\n"
                        f"Authorization: Bearer {subkey}\r\nContent-Length: {len(body)}\r\n\r\n").encode() + body
        self.sock = None
        self.kernel_delays, self.process_delays = [], []  # ns

    def connect(self):
        self.sock = socket.create_connection((self.url.hostname, self.url.port), timeout=30)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if KERNEL_TIMESTAMPS:
            self.sock.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)

    def close(self):
        if self.sock:
            self.sock.close()
            self.sock = None

    def stream(self):
        """Sends one request; returns the decoded payload and, for the recv that brought its first byte, when it
        returned (monotonic) and the kernel's timestamp of the bytes it read (realtime, or None)."""
        if self.sock is None:
            self.connect()
        self.sock.sendall(self.request)
        raw, arrivals = b"", []  # arrivals: (offset in raw where a recv's bytes start, monotonic, kernel stamp)
        while True:
            data, ancillary, _, _ = self.sock.recvmsg(65536, 1024)
            now = time.monotonic_ns()
            if not data:  # the peer closed: a close-delimited answer ends here, anything else is cut short
                self.close()
                done, payload, first = parse(raw, closed=True)
                if not done:
                    raise RuntimeError(f"{self.name}: connection closed mid-answer after {len(raw)} bytes")
                break
            arrivals.append((len(raw), now, timestamp(ancillary, SO_TIMESTAMPNS)))
            raw += data
            done, payload, first = parse(raw)
            if done:
                if re.search(rb"(?i)\r\nconnection:\s*close", raw.split(b"\r\n\r\n", 1)[0]):
                    self.close()
                break
        status = raw.split(b" ", 2)[1] if raw.startswith(b"HTTP/1.1 ") else b"?"
        if status != b"200":
            raise RuntimeError(f"{self.name}: status {status.decode(errors='replace')}: {raw[:300]!r}")
        if first is None:
            raise RuntimeError(f"{self.name}: empty body")
        _, returned, stamp = next(arrival for arrival in reversed(arrivals) if arrival[0] <= first)
        return payload, returned, stamp


def parse(raw, closed=False):
    """(complete?, decoded payload, offset in raw of the payload's first byte) of a response read so far."""
    end = raw.find(b"\r\n\r\n")
    if end < 0:
        return False, b"", None
    head, start = raw[:end].lower(), end + 4
    if re.search(rb"\r\ntransfer-encoding:[^\r]*chunked", head):
        position, payload, first = start, b"", None
        while True:
            line_end = raw.find(b"\r\n", position)
            if line_end < 0:
                return False, payload, first
            size = int(raw[position:line_end].split(b";")[0], 16)
            if size == 0:  # the last chunk, then (trailers and) an empty line
                return raw.find(b"\r\n\r\n", line_end) >= 0, payload, first
            data_start = line_end + 2
            if first is None and len(raw) > data_start:
                first = data_start
            if len(raw) < data_start + size + 2:
                return False, payload + raw[data_start:], first
            payload += raw[data_start:data_start + size]
            position = data_start + size + 2
    length = re.search(rb"\r\ncontent-length:\s*(\d+)", head)
    body = raw[start:]
    first = start if body else None
    if length:
        return len(body) >= int(length.group(1)), body, first
    return closed, body, first


def percentile(values, share):  # nearest rank
    ordered = sorted(values)
    return ordered[max(0, math.ceil(share * len(ordered)) - 1)]


def statistics(delays_ns):
    us = [delay / 1000 for delay in delays_ns]
    return {"p50_us": round(percentile(us, 0.50), 1), "p99_us": round(percentile(us, 0.99), 1),
            "max_us": round(max(us), 1), "min_us": round(min(us), 1)}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--upstream-port", type=int, required=True)
    parser.add_argument("--target", action="append", required=True, metavar="NAME=URL")
    parser.add_argument("--subkey", required=True)
    parser.add_argument("--streams", type=int, default=300)
    parser.add_argument("--pause-ms", type=float, default=20)
    parser.add_argument("--out")
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # so that the upstream child is ended too

    ours, theirs = multiprocessing.Pipe()
    child = multiprocessing.Process(target=upstream, args=(args.upstream_port, args.pause_ms / 1000, theirs),
                                    daemon=True)
    child.start()
    try:
        if not ours.poll(10) or ours.recv() != "ready":
            sys.exit("bench_first_byte.py: the fake upstream did not start")
        targets = [Target(*spec.split("=", 1), args.subkey) for spec in args.target]
        sent = {}  # request number -> (monotonic after the write, kernel TX stamp)
        for round_ in range(WARMUP_ROUNDS + args.streams):
            for target in targets:
                payload, returned, received = target.stream()
                match = re.search(rb"chatcmpl-fb-(\d+)", payload)
                if not match or b"[DONE]" not in payload:
                    raise RuntimeError(f"{target.name}: not the whole stream: {payload[:300]!r}")
                number = int(match.group(1))
                while number not in sent:
                    if not ours.poll(5):
                        raise RuntimeError(f"{target.name}: the upstream never reported request {number}")
                    reported, *times = ours.recv()
                    sent[reported] = times
                after_write, transmitted = sent.pop(number)
                if round_ >= WARMUP_ROUNDS:
                    target.process_delays.append(returned - after_write)
                    if transmitted is not None and received is not None:
                        target.kernel_delays.append(received - transmitted)
    except (RuntimeError, OSError) as error:
        print(f"bench_first_byte.py: {error}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        sys.exit(130)
    finally:
        child.terminate()
        child.join()

    kernel = all(len(target.kernel_delays) == args.streams for target in targets)
    results = {}
    for target in targets:
        target.close()
        result = statistics(target.kernel_delays if kernel else target.process_delays)
        result.update(streams=args.streams, process=statistics(target.process_delays))
        results[target.name] = result
        print(f"first byte {target.name:<8} {args.streams:4d} streams  p50 {result['p50_us']:8.1f} µs  "
              f"p99 {result['p99_us']:8.1f} µs  max {result['max_us']:8.1f} µs   (process clocks: "
              f"p50 {result['process']['p50_us']:.1f}, p99 {result['process']['p99_us']:.1f})")
    if args.out:
        with open(args.out, "w") as file:
            clock = "kernel socket timestamps" if kernel else "process clocks"
            json.dump({"measured_with": clock, "pause_ms": args.pause_ms, "targets": results}, file, indent=2)


if __name__ == "__main__":
    main()
