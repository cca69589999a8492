rule pretrain:
    """Train a model from scratch in one attention layout; every layout sees the same tokens in the same order."""
    input:
        tokenizer=path("model"),
        data=path("tokens", data=DATA),
        code=code("kvshare.pretrain", "pretrain", "model={model}", "data={data}", "scale={scale}"),
    output:
        directory(path("pretrained")),
    params:
        hydra=lambda wc: hydra("pretrain", f"{wc.model}/{wc.layout}", "data", "scale"),
    conda:
        "../../environment.yml"
    log:
        path("log", rule="pretrain", name="{model}_{layout}"),
    benchmark:
        path("benchmark", rule="pretrain", name="{model}_{layout}")
    resources:
        gpu=1,
    shell:
        "python -m kvshare.pretrain {params.hydra} model={wildcards.model} "
        "pretrain.layout={wildcards.layout} pretrain.tokenizer={input.tokenizer} pretrain.data_dir={input.data} "
        "pretrain.out={output} > {log} 2>&1"
