"""Parts of ``bench/serve.py``: images, load generators (Python client, wrk), server processes, in-process
measurements and the report."""
