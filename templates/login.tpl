% rebase('base.tpl', title='Log in')
<h1>Log in</h1>
% if notice == 'password':
<p class="picked" role="status">Your password was changed and every sign-in ended. Log in with the new one.</p>
% end
% if error:
<p class="error" role="alert">{{error}}</p>
% end
<form method="post" action="/dashboard/login" class="stack">
  <input type="hidden" name="csrf" value="{{csrf}}">
  <input type="hidden" name="next" value="{{next}}">
  <label for="email">Email</label>
  <input id="email" name="email" type="email" autocomplete="username" required value="{{email}}">
  <label for="password">Password</label>
  <input id="password" name="password" type="password" autocomplete="current-password" required>
  <button type="submit">Log in</button>
</form>
% if registration_open:
<p>New here? <a href="/dashboard/signup">Sign up</a>.</p>
% end
