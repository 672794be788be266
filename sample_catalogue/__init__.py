"""The sample catalogue: real product photos (Fashion-MNIST, `fashion_mnist`) and the shop listings
made from them (`products`).

A package of its own because two sides use it and neither may import the other
(docs/ARCHITECTURE.md §2): the demo and the local rollout (localstack/) index these listings, and the
evaluation (evaluation/) measures on the same photos and judges queries against the same listings.
"""
