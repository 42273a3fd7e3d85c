# make demo: the whole system simulated on one machine (docs/demo.md).
# Included by the top Makefile (STAMP, VPY and QUBES_GPU_SHARE_QUBES_PATH
# come from there). Writes demo-out/ (git-ignored): the PNGs and the logs.
DEMO_OUT := demo-out

.PHONY: demo
demo: $(STAMP)
	$(VPY) demo/run_demo.py --out $(DEMO_OUT)
