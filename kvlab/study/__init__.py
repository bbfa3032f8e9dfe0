"""Study support: the analyses behind the notebooks (:mod:`.analysis`), findings text and saved metrics
(:mod:`.report`), the README's generated Findings block (:mod:`.findings`), figures (:mod:`.plots`), the
papermill runner (:mod:`.runner`) and tables read from saved benchmark results (:mod:`.kernel_tables`,
:mod:`.lossless_report`). Nothing here imports the kernels."""
