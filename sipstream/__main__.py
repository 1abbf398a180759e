from sipstream.cli import main

main()
