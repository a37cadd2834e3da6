"""Built-in perturbdiff plug-ins, registered through entry points exactly as third-party ones are."""
