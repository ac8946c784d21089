"""Ray cluster glue: runtime environment, job submission, local head start/stop."""
