"""A loopback HTTP server over a folder, for the tests that download (converters, img2dataset)."""
import contextlib
import functools
import http.server
import threading


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    """Serves the folder without a log line per request."""

    def log_message(self, *args):
        pass


@contextlib.contextmanager
def serve_folder(root, handler=QuietHandler):
    """Serve `root` on 127.0.0.1 (a free port) while the block runs; yields the base URL."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(handler, directory=str(root)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
