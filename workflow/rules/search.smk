rule search:
    """Choose which KV heads merge (and which layers share K/V) within the budget: a plan JSON."""
    input:
        model=base_model,
        code=code("kvshare.search", "search", "model={model}", "scale={scale}"),
    output:
        path("plan"),
    params:
        hydra=lambda wc: hydra("search", f"{wc.model}/{wc.method}/{wc.budget}", "scale"),
    conda:
        "../../environment.yml"
    priority: 2  # the chain to fine-tuning first: its jobs are the longest (see finetune)
    log:
        path("log", rule="search", name="{model}_{method}_{budget}"),
    threads: 2  # search.workers: layers are searched in parallel processes
    benchmark:
        path("benchmark", rule="search", name="{model}_{method}_{budget}")
    shell:
        "python -m kvshare.search {params.hydra} model={wildcards.model} search.model_dir={input.model} "
        "search.method={wildcards.method} search.budget={wildcards.budget} search.out={output} > {log} 2>&1"
