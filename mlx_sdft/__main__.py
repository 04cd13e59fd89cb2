from mlx_sdft.cli import main

main()
