rule search:
    """Choose which KV heads merge (and which layers share K/V) within the budget: a plan JSON."""
    input:
        model=base_model,
        code=code("search", "qcqa", "nsga", "exact", "proxy", "wse", "plan", "models"),
    output:
        f"{RESULTS}/plans/{{model}}/{{method}}/{{budget}}.json",
    params:
        hydra=lambda wc: hydra("search", f"{wc.model}/{wc.method}/{wc.budget}"),
    conda:
        "../../environment.yml"
    log:
        f"{LOGS}/search/{{model}}_{{method}}_{{budget}}.log",
    threads: 2  # search.workers: layers are searched in parallel processes
    benchmark:
        f"{LOGS}/benchmarks/search/{{model}}_{{method}}_{{budget}}.tsv"
    shell:
        "python -m kvshare.search {params.hydra} model={wildcards.model} search.model_dir={input.model} "
        "search.method={wildcards.method} search.budget={wildcards.budget} search.out={output} > {log} 2>&1"
