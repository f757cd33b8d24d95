"""What the bento ships and the service imports: preprocessing, the model program and its
`model.json`, drift. Only numpy, pandas, torch and whylogs (a test holds it to that)."""
