# Benchmarks of megatron-pr2: router overhead next to Megatron-Core's stock and replay routers
# (bench_router.py) and route storage / transport sizes (bench_storage.py). See README.md.
