print("casfs")
