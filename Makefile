# Shortcuts for the commands in README.md.
DATA ?= ../shared/comp5329

.PHONY: run test bench bench-image research holdout results-sections notebooks seeds
run:        ## the main job: every stage, ending in output/predictions.csv
	./setup.sh && python3 -m multilabel_fusion
test:       ## the test suite
	./setup.sh && python3 -m pytest -q
bench:      ## regenerate docs/RESULTS.md from cold and warm runs on $(DATA)
	python3 -m multilabel_fusion.reports.bench --data $(DATA)
bench-image: ## time the extraction of every image of $(DATA) with each backbone (output/metrics/image_benchmark.json)
	python3 stages/01_image_network.py --data $(DATA) --bench all --backbones efficientnet_lite0 resnet50 vgg16
research:   ## stages 05 and 06 with their comparison tables, sweeps and learning curves (about an hour on 2 CPU cores)
	python3 stages/05_label_decoder.py --data $(DATA) --set label_decoder.comparisons=true
	python3 stages/06_joint_embedding.py --data $(DATA) --set joint_embedding.comparisons=true
holdout:    ## hold out 20 % of $(DATA)'s labelled records, run the main job on the rest, score it on them
	python3 -m multilabel_fusion.reports.holdout_check --data $(DATA)
results-sections: ## re-render only the stage 05/06 sections of docs/RESULTS.md from their snapshots (docs/stage_results/)
	python3 -m multilabel_fusion.reports.bench --stage-sections
notebooks:  ## regenerate the notebooks and README's badges (repository address: the git remote, or REPO_URL=...)
	python3 notebooks/make_notebooks.py $(if $(REPO_URL),--repo-url $(REPO_URL))
seeds:      ## docs/SEEDS.md: every system of the source documents, published figure beside ours (rows not yet measured run; hours on 2 CPU cores)
	python3 -m multilabel_fusion.reports.seeds --data $(DATA)
