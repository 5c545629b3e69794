"""A traced server for the hostile-input tests: what it answers depends on the path of the
first request of each connection.

  /ok       a canned 200 for every request head it reads (pipelining included)
  /garbage  random bytes, then close
  /sink     reads forever, never answers
  anything that is not an HTTP request: random bytes back, then close

Usage: hostile_server.py PORT
"""
import asyncio
import os
import resource
import sys

OK = b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 3\r\n\r\nok\n"


async def handle(reader, writer):
    try:
        # Enough bytes to tell the path (a slow client sends them one at a time).
        first = b""
        while len(first) < 9:
            more = await reader.read(65536)
            if not more:
                break
            first += more
        if first.startswith(b"GET /ok") or first.startswith(b"POST /ok"):
            # Answer each request head; keep the last 3 bytes for a terminator split
            # across reads.
            data = first
            carry = b""
            while data:
                buf = carry + data
                n = buf.count(b"\r\n\r\n")
                if n:
                    writer.write(OK * n)
                    await writer.drain()
                    carry = buf[buf.rfind(b"\r\n\r\n") + 4 :][-3:]
                else:
                    carry = buf[-3:]
                data = await reader.read(65536)
        elif first.startswith(b"GET /sink") or first.startswith(b"POST /sink"):
            while await reader.read(65536):
                pass
        else:
            for _ in range(4):
                writer.write(os.urandom(16384))
            await writer.drain()
    except (ConnectionError, OSError):
        pass
    finally:
        writer.close()


async def main(port):
    server = await asyncio.start_server(handle, "127.0.0.1", port, backlog=4096)
    print("listening", flush=True)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    asyncio.run(main(int(sys.argv[1])))
