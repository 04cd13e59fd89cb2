from mlx_sdft.cli import app

app()
