"""Training commands: build patch datasets from simulated scans and fit the models shipped in Resources/Models."""
