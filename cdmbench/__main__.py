from cdmbench.cli import main

main()
