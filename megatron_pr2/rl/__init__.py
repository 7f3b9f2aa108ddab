# End-to-end RL demo of megatron-pr2: GRPO on a synthetic arithmetic task with a tiny
# Megatron-Core MoE GPT, comparing routing modes none / r2 / r3 / pr2 / pr2-r3.
#
# Importing this package does not import megatron-core: modules that build models (model, sft,
# rollout, loop, demo's runners) do, and on CPU they need megatron_pr2.cpu.apply_cpu_patches()
# first (megatron_pr2.rl.demo.main calls it). task, tokenizer, grpo, metrics and report are
# megatron-free.
