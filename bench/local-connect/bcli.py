import socket, sys, time
port=int(sys.argv[1]); n=int(sys.argv[2])
t=time.perf_counter()
for i in range(n):
    s=socket.socket(); s.connect(('198.51.100.1',port)); s.recv(10); s.close()
dt=time.perf_counter()-t
print(f"port {port}: {n/dt:.0f} conn/s ({dt/n*1e6:.1f} us/conn)")
