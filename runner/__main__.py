from runner._entry import main

main()
