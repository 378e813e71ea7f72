"""The seed's second SideRunner example: ten downloads at a time.

Usage: seed_parallel_downloader.py SERVED_DIR OUT_DIR

Serves SERVED_DIR over HTTP on 127.0.0.1, downloads every file in it into
OUT_DIR through the example's loop, then prints the peak number of
downloads that were going at once. Only the import line differs from the
original library's example.
"""

import functools
import http.server
import pathlib
import sys
import threading
import urllib.request

from mlworkflow_async.sync import SideRunner


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format, *args):
        pass


served, out = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])
server = http.server.ThreadingHTTPServer(
    ("127.0.0.1", 0), functools.partial(QuietHandler, directory=str(served))
)
threading.Thread(target=server.serve_forever, daemon=True).start()
base_url = f"http://127.0.0.1:{server.server_address[1]}/"
items = sorted(path.name for path in served.iterdir())

lock = threading.Lock()
going = peak = 0


def download_item(item):
    global going, peak
    with lock:
        going += 1
        peak = max(peak, going)
    try:
        with urllib.request.urlopen(base_url + item, timeout=10) as response:
            (out / item).write_bytes(response.read())
    finally:
        with lock:
            going -= 1


parallel_downloader = SideRunner(10)
for item in items:
    parallel_downloader.run_async(download_item, item)
parallel_downloader.collect_runs()

server.shutdown()
print("downloaded", len(list(out.iterdir())), "peak", peak)
