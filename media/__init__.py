"""Fetching and decoding product images, shared by the pipelines and the search service.

Plain Python (urllib3, Pillow, torch's resampler): no Beam, so `search` can use it without
depending on the pipelines' transforms. `download` fetches through `host_guard`'s address
check; `decode` turns the bytes into the model's pixels.
"""
