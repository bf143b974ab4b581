# Shortcuts for the commands in README.md.
DATA ?= ../shared/comp5329

.PHONY: run test bench notebooks
run:        ## the main job: every stage, ending in output/predictions.csv
	./setup.sh && python3 -m multilabel_fusion
test:       ## the test suite
	./setup.sh && python3 -m pytest -q
bench:      ## regenerate docs/RESULTS.md from cold and warm runs on $(DATA)
	python3 -m multilabel_fusion.bench --data $(DATA)
notebooks:  ## regenerate the notebooks from notebooks/make_notebooks.py
	python3 notebooks/make_notebooks.py
