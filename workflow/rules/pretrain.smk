rule pretrain:
    """Train a model from scratch in one attention layout; every layout sees the same tokens in the same order."""
    input:
        tokenizer="resources/models/{model}",
        data=f"resources/data/{{model}}/{DATA}",
        code=code("pretrain", "training", "finetune", "modeling", "merge", "plan", "data", "models"),
    output:
        directory(f"{RESULTS}/pretrained/{{model}}/{{layout}}"),
    params:
        hydra=lambda wc: hydra("pretrain", f"{wc.model}/{wc.layout}"),
    conda:
        "../../environment.yml"
    log:
        f"{LOGS}/pretrain/{{model}}_{{layout}}.log",
    benchmark:
        f"{LOGS}/benchmarks/pretrain/{{model}}_{{layout}}.tsv"
    resources:
        gpu=1,
    shell:
        "python -m kvshare.pretrain {params.hydra} model={wildcards.model} data={DATA} "
        "pretrain.layout={wildcards.layout} pretrain.tokenizer={input.tokenizer} pretrain.data_dir={input.data} "
        "pretrain.out={output} > {log} 2>&1"
