EVALUATE = (
    "python -m kvshare.evaluate {params.hydra} evaluate.checkpoint={input.checkpoint} "
    "evaluate.base_dir={input.base} evaluate.data_dir={input.data} evaluate.eval_data_dir={input.eval_data} "
    "evaluate.variant={params.variant} evaluate.out={output} > {log} 2>&1"
)


rule evaluate:
    """Perplexity, KL and top-1 agreement with the base model, zero-shot accuracy, KV bytes (analytic and measured)."""
    input:
        checkpoint=path("checkpoint"),
        base=base_model,
        data=path("tokens", data=DATA),
        eval_data=path("eval_data"),
        code=code("kvshare.evaluate", "evaluate", "scale={scale}"),
    output:
        path("metrics"),
    params:
        hydra=lambda wc: hydra("evaluate", f"{wc.model}/{wc.method}/{wc.budget}/{wc.variant}", "scale"),
        variant=lambda wc: wc.variant,
    conda:
        "../../environment.yml"
    log:
        path("log", rule="evaluate", name="{model}_{method}_{budget}_{variant}"),
    resources:
        gpu=1,
    shell:
        EVALUATE


rule evaluate_pretrained:
    """The same measures for a model pretrained from scratch in one layout (KL and agreement: to the base layout)."""
    input:
        checkpoint=path("pretrained"),
        base=base_model,
        data=path("tokens", data=DATA),
        eval_data=path("eval_data"),
        code=code("kvshare.evaluate", "evaluate", "scale={scale}"),
    output:
        path("metrics_pretrained"),
    params:
        hydra=lambda wc: hydra("evaluate", f"{wc.model}/{wc.layout}/pretrained", "scale"),
        variant="pretrained",
    conda:
        "../../environment.yml"
    log:
        path("log", rule="evaluate", name="{model}_{layout}_pretrained"),
    resources:
        gpu=1,
    shell:
        EVALUATE
