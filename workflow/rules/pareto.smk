METRICS = [
    f"{RESULTS}/metrics/{model}/{method}/{budget}/{variant}.json"
    for model, method, budget in GRID
    for variant in VARIANTS
] + [
    f"{RESULTS}/metrics/{model}/pretrained/{layout}.json"
    for model in config["models"]
    for layout in (PRETRAIN or {}).get("layouts", [])
]
if config.get("partial"):  # a study cut short: the tables of what was evaluated (run with --allowed-rules pareto)
    METRICS = [m for m in METRICS if os.path.exists(m)]


rule pareto:
    """One table of every variant read back from MLflow, Pareto fronts of quality against KV bytes, plots."""
    input:
        metrics=METRICS,
        code=code("pareto", "fronts", "comparisons"),
    output:
        PARETO,
    params:
        hydra=hydra("pareto", STUDY),
        model=config["models"][0],
        metrics=lambda wc, input: ",".join(input.metrics),
        out_dir=lambda wc, output: os.path.dirname(output[0]),
    conda:
        "../../environment.yml"
    log:
        f"{LOGS}/pareto.log",
    shell:
        "python -m kvshare.pareto {params.hydra} model={params.model} 'pareto.metrics=[{params.metrics}]' "
        "pareto.out_dir={params.out_dir} > {log} 2>&1"
